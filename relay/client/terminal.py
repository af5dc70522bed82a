"""`relay watch`: follow a task in a terminal, as a progress line or JSON lines."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import urljoin

from .client import RelayClient, RelayError, TaskWatch

# `relay watch` ends with exit status 2 once it could not reach the relay for this long.
WATCH_GIVE_UP = 30.0
BAR_WIDTH = 24


def number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def progress_text(state: Mapping[str, Any]) -> str:
    """One line for a state: status, bar, percentage, node, step of max steps, ETA."""
    status = str(state.get("status", "?"))
    if status == "waiting":
        place = number(state.get("lastQueueRemaining"))
        return f"{status:<9} " + (f"queue place {place:.0f}" if place else "in the queue")
    progress = min(max(number(state.get("progress")) or 0.0, 0.0), 1.0)
    filled = round(progress * BAR_WIDTH)
    parts = [f"{status:<9} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {progress:4.0%}"]
    node = state.get("state")
    if isinstance(node, Mapping):
        if node.get("nodeLabel"):
            parts.append(str(node["nodeLabel"]))
        step, steps = number(node.get("step")), number(node.get("maxSteps"))
        if step is not None and steps:
            parts.append(f"step {step:.0f}/{steps:.0f}")
    eta = number(state.get("etaRelative"))
    if status == "running" and eta is not None and eta > 0:
        parts.append(f"ETA {seconds_text(eta)}")
    return "  ".join(parts)


def problem_text(problem: Mapping[str, Any]) -> str:
    """What is being retried, in a few words: `message (code); retrying`."""
    message = str(problem.get("message") or "")
    code = str(problem.get("code") or "error")
    text = f"{message} ({code})" if message else code
    return text if "retrying" in message else f"{text}; retrying"


def status_text(watch: TaskWatch) -> str:
    """The status line: the progress, or what the watch is waiting for."""
    state, problem = watch.state, watch.problem
    if problem is not None:
        if state is None:
            return problem_text(problem)
        return f"{state.get('status', '?')!s:<9} {problem_text(problem)}"
    if state is not None:
        return progress_text(state)
    return f"connecting to {watch.client.base_url} ..."


class ProgressLine:
    """The progress line: redrawn in place with carriage returns on a terminal, or one line
    per change otherwise (a log file, a pipe)."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.shown = ""

    def show(self, text: str) -> None:
        if text == self.shown:
            return
        if self.live:
            width = max(20, shutil.get_terminal_size().columns - 1)
            text = text[:width]
            self.out.write("\r" + text.ljust(len(self.shown)))
        else:
            self.out.write(text + "\n")
        self.shown = text
        self.out.flush()

    def close(self) -> None:
        """End the line in place, so that what follows starts on a line of its own."""
        if self.live and self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = ""


def result_lines(state: Mapping[str, Any], base_url: str) -> list[str]:
    """What follows the last progress line: the failure's message, or the images made."""
    if state.get("status") == "failed":
        return [f"error: {state['message']}"] if state.get("message") else []
    result = state.get("result")
    images = result.get("images") if isinstance(result, Mapping) else None
    if not isinstance(images, list):
        return []
    return [f"image: {urljoin(base_url + '/', str(image))}" for image in images]


async def watch_in_terminal(
    base_url: str,
    task_id: str,
    *,
    token: str | None,
    json_lines: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """`relay watch`: follow a task, showing each state; the exit status.

    0 when the task succeeded, 1 when it failed, 2 when it is unknown, the relay refused,
    or the relay could not be reached for WATCH_GIVE_UP seconds.
    """
    line = ProgressLine(out, live=out.isatty())

    def on_problem(watch: TaskWatch) -> None:
        # A line of its own kind, which no state is: {"problem": {...}}, then
        # {"problem": null} once it is over.
        if json_lines:
            out.write(json.dumps({"problem": watch.problem}, ensure_ascii=False) + "\n")
            out.flush()
        else:
            line.show(status_text(watch))

    async with RelayClient(base_url, token=token, give_up_after=WATCH_GIVE_UP) as client:
        try:
            async with client.watch(task_id, on_problem=on_problem) as watch:
                if line.live and not json_lines:
                    line.show(status_text(watch))  # "connecting to ...": nothing came yet
                async for state in watch:
                    if json_lines:
                        out.write(json.dumps(state, ensure_ascii=False) + "\n")
                        out.flush()
                    else:
                        line.show(progress_text(state))
        except RelayError as exc:
            line.close()
            err.write(f"relay: error: {exc}\n")
            return 2
    final = watch.state or {}
    if not json_lines:
        line.close()
        for text in result_lines(final, client.base_url):
            out.write(text + "\n")
        out.flush()
    status = watch.ended or final.get("status")
    return 0 if status == "succeeded" else 1 if status == "failed" else 2
