"""`relay watch` as a child process against a real relay: exit statuses, `--json` lines, the
progress line (one per change in a pipe, redrawn in place on a terminal)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace

import httpx

from relay.app import create_app
from relay.cli import WATCH_OPTIONS
from relay.client import DEFAULT_URL
from relay.tokens import mint

from .conftest import FAST, RelayFactory, SimulatedUpstream
from .servers import ROOT, ProcessServer, ThreadServer, free_port

SECRET = "w" * 32


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RELAY_URL", "RELAY_TOKEN")}
    return env | extra


def relay_watch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "watch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=environment(**env),
        stdin=subprocess.DEVNULL,
    )


def held_task(upstream: SimulatedUpstream, duration: float) -> str:
    """A task that waits in the queue until released: a loaded machine may take seconds
    to start `python -m relay`, and the command should see the task from its start. (The
    relay must poll waiting tasks often, or it may see only the end after the release.)"""
    return upstream.start_task(queue=600, duration=duration)


def release(upstream: SimulatedUpstream, task_id: str) -> None:
    """Let a held task leave the queue and start running now."""
    task = upstream.simulator.tasks[task_id]
    task.queue_seconds = time.monotonic() - task.created


def start_watch(*args: str) -> subprocess.Popen[str]:
    """`relay watch ARGS` as a child process, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "watch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=environment(),
    )


def watch_released(
    upstream: SimulatedUpstream, task_id: str, *args: str
) -> tuple[int, list[str], str]:
    """`relay watch` on a held task, released once the command showed its first line."""
    process = start_watch(*args)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        release(upstream, task_id)
        rest, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, (first + rest).splitlines(), errors


def test_a_succeeded_task_exits_0_with_a_progress_line_per_change(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(waiting_interval_max=0.1)
    task_id = held_task(upstream, duration=1.5)
    status, lines, errors = watch_released(upstream, task_id, task_id, "--url", relay.url)
    assert (status, errors) == (0, "")
    assert re.fullmatch(r"waiting   queue place \d+", lines[0]), lines[0]
    running = [line for line in lines if line.startswith("running   [")]
    assert len(running) >= 5
    assert any("KSampler  step " in line and "/20  ETA " in line for line in running)
    assert lines[-2] == "succeeded [########################] 100%"
    # Resolved against the upstream (a `relay simulate`, here), which serves the image.
    assert lines[-1] == f"image: {upstream.url}/sim/images/{task_id}.svg"
    assert httpx.get(lines[-1].removeprefix("image: ")).status_code == 200


def test_a_failed_task_exits_1_with_its_message(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    task_id = upstream.start_task(queue=0.1, duration=1.0, fail=True)
    result = relay_watch(task_id, "--url", relay.url)
    assert (result.returncode, result.stderr) == (1, "")
    lines = result.stdout.splitlines()
    final = upstream.final_state(task_id)
    assert lines[-2].startswith("failed    [") and final["state"]["nodeLabel"] in lines[-2]
    assert lines[-1] == f"error: {final['message']}"


def test_json_prints_one_whole_state_per_line(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(waiting_interval_max=0.1)
    task_id = held_task(upstream, duration=1.0)
    status, lines, errors = watch_released(upstream, task_id, "--json", task_id, "--url", relay.url)
    assert (status, errors) == (0, "")
    states = [json.loads(line) for line in lines]
    assert len(states) >= 4
    assert all(state["taskId"] == task_id for state in states)
    assert states[0]["status"] == "waiting" and states[-1] == upstream.final_state(task_id)
    assert [s["status"] for s in states[-2:]] == ["running", "succeeded"]
    # A failed task's lines end with its failed state, and exit 1.
    failed = upstream.start_task(queue=0.1, duration=0.5, fail=True)
    result = relay_watch(failed, "--json", "--url", relay.url)
    assert result.returncode == 1
    assert json.loads(result.stdout.splitlines()[-1]) == upstream.final_state(failed)


def test_an_unknown_task_exits_2_with_one_error_line(relay: ThreadServer) -> None:
    for _ in range(2):  # the stream's error event, then the relay's 404
        result = relay_watch("no-such-task", "--url", relay.url)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr.splitlines() == [
            "relay: error: upstream does not know task no-such-task (task_not_found)"
        ]


def test_refusals_exit_2_and_a_token_from_the_flag_or_the_environment_is_sent(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(token_secret=SECRET)
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    refused = relay_watch(task_id, "--url", relay.url)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.startswith("relay: error: a token is required")
    assert refused.stderr.rstrip().endswith("(unauthorized)")
    token = mint(SECRET, [task_id], 60)
    assert relay_watch(task_id, "--url", relay.url, RELAY_TOKEN=token).returncode == 0
    # The flag wins over the environment.
    other = mint(SECRET, ["another-task"], 60)
    assert (
        relay_watch(task_id, "--url", relay.url, "--token", token, RELAY_TOKEN=other).returncode
        == 0
    )
    wrong = relay_watch(task_id, "--url", relay.url, RELAY_TOKEN=other)
    assert wrong.returncode == 2 and "does not cover" in wrong.stderr


def test_the_url_comes_from_the_flag_then_relay_url_then_the_default(
    relay: ThreadServer, upstream: SimulatedUpstream
) -> None:
    assert WATCH_OPTIONS[0].default == DEFAULT_URL == "http://127.0.0.1:8000"
    task_id = upstream.start_task(queue=0.1, duration=0.5)
    assert relay_watch(task_id, RELAY_URL=relay.url).returncode == 0
    assert relay_watch(task_id, "--url", relay.url, RELAY_URL="ftp://nowhere").returncode == 0
    bad = relay_watch(task_id, RELAY_URL="ftp://nowhere")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.splitlines() == [
        "relay: error: RELAY_URL must be a URL starting with http:// or https://,"
        " got 'ftp://nowhere'"
    ]
    invalid = relay_watch("no/such/id", RELAY_URL=relay.url)
    assert invalid.returncode == 2 and invalid.stderr.startswith("relay: error: task ID must be")


def test_on_a_terminal_the_progress_line_is_redrawn_in_place(
    make_relay: RelayFactory, upstream: SimulatedUpstream
) -> None:
    relay = make_relay(waiting_interval_max=0.1)
    task_id = held_task(upstream, duration=1.5)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "watch", task_id, "--url", relay.url],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=ROOT,
        env=environment(),
    )
    os.close(terminal)
    output = b""
    released = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([controller], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not released and b"waiting" in output:
                release(upstream, task_id)
                released = True
        status = process.wait(10)
    finally:
        process.kill()
        os.close(controller)
    text = output.decode()
    assert status == 0, text
    # The terminal turns each "\n" into "\r\n": what is left is the line redrawn in place.
    lines = text.replace("\r\n", "\n").split("\n")
    assert lines[-1] == "" and lines[-2] == f"image: {upstream.url}/sim/images/{task_id}.svg"
    redraws = lines[0].split("\r")
    assert redraws[:2] == ["", f"connecting to {relay.url} ..."], redraws
    assert re.fullmatch(r"waiting   queue place \d+", redraws[2].rstrip()), redraws
    assert len(redraws) >= 6 and any(r.startswith("running   [") for r in redraws)
    assert redraws[-1].rstrip() == "succeeded [########################] 100%"
    assert len(lines) == 3


def first_line(*args: str, timeout: float = 20) -> str:
    """The first line `relay watch ARGS` prints, within `timeout` seconds; then it is killed."""
    process = start_watch(*args)
    try:
        assert process.stdout is not None
        assert select.select([process.stdout], [], [], timeout)[0], "nothing printed"
        return process.stdout.readline().rstrip("\n")
    finally:
        process.kill()
        process.wait(5)


def test_a_problem_the_relay_is_retrying_is_shown_while_no_state_comes() -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: the upstream is down
    relay = ThreadServer(create_app(replace(FAST, upstream_url=down))).start()
    try:
        line = first_line("task-while-down", "--url", relay.url)
        problem = json.loads(first_line("task-while-down", "--json", "--url", relay.url))
    finally:
        relay.stop()
    assert line.endswith("(upstream_unavailable)") and "retrying" in line, line
    assert set(problem) == {"problem"}, problem  # a line no state can be mistaken for
    assert problem["problem"]["code"] == "upstream_unavailable"
    assert problem["problem"]["retrying"] is True


def test_a_relay_that_cannot_be_reached_is_shown_at_once() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    started = time.monotonic()
    line = first_line("some-task", "--url", url)
    assert time.monotonic() - started < 10
    assert line.startswith(f"cannot reach the relay at {url}: ")
    assert line.endswith("(relay_unavailable); retrying"), line
    problem = json.loads(first_line("some-task", "--json", "--url", url))
    assert problem["problem"]["code"] == "relay_unavailable"


def test_it_works_out_of_the_box_on_the_embedded_simulator() -> None:
    relay = ProcessServer(["serve"]).start()
    try:
        answer = httpx.post(
            f"{relay.url}/sim/tasks", json={"queue": 0, "duration": 1, "fail": False}
        )
        task_id = answer.json()["taskId"]
        result = relay_watch(task_id, RELAY_URL=relay.url)
    finally:
        relay.stop()
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[-1] == f"image: {relay.url}/sim/images/{task_id}.svg"
