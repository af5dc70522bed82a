"""A simulated upstream that speaks the real progress API, with faults on demand.

Tasks wait in a queue, then run through ComfyUI-like nodes step by step, and end
`succeeded` or, now and then, `failed`. Progress follows the wall clock, so a
task looks the same whoever asks and however often. A waiting task's
`lastQueueRemaining` is its place in the queue, counting down as the tasks ahead
of it start.

Upstream routes (as the real service): `POST /scc/comfy_get_progress`,
`POST /scc/comfy_get_result`. Control routes (the simulator's own):
`POST /sim/tasks` starts a task, `GET /sim/stats` counts calls per task,
`POST /sim/faults` makes the upstream misbehave, `GET /sim/images/{id}.svg`
serves a finished task's picture.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .upstream.client import NOT_FOUND_CODE
from .upstream.signing import NonceCache, error_status, verify_request

# (node label, steps): a text-to-image workflow with an upscale pass.
WORKFLOW: tuple[tuple[str, int], ...] = (
    ("CheckpointLoaderSimple", 1),
    ("CLIPTextEncode", 2),
    ("KSampler", 20),
    ("VAEDecode", 1),
    ("IterativeImageUpscale", 12),
    ("VAEDecode", 1),
    ("SaveImage", 1),
)
TOTAL_STEPS = sum(steps for _, steps in WORKFLOW)
FAULT_KINDS = ("error", "throttle", "timeout", "malformed")
MAX_TASKS = 100_000
# The simulated queue starts one task every ADMIT_EVERY seconds: a task with s seconds
# still to wait is at place ceil(s / ADMIT_EVERY), which counts down as it waits. A task
# started without a queue time joins the back, ADMIT_EVERY after the last one that did, so
# a batch started together leaves the queue one by one, each at its own place.
ADMIT_EVERY = 1.0
IMAGE_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">'
    '<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">'
    '<stop offset="0" stop-color="hsl({hue},80%,60%)"/>'
    '<stop offset="1" stop-color="hsl({hue2},70%,35%)"/></linearGradient></defs>'
    '<rect width="256" height="256" fill="url(#g)"/>'
    '<circle cx="170" cy="90" r="40" fill="hsl({hue3},90%,85%)" opacity=".8"/>'
    '<path d="M0 200 L80 130 L140 180 L200 120 L256 170 L256 256 L0 256Z" fill="rgba(0,0,0,.35)"/>'
    "</svg>"
)


def seconds(value: object, name: str) -> float | None:
    """A number from a control request's body (not a boolean, not a string); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


@dataclass
class SimTask:
    task_id: str
    created: float
    queue_seconds: float
    run_seconds: float
    fail_at: float | None  # fraction of the run at which it fails, None when it succeeds

    def state(self, now: float) -> dict[str, Any]:
        elapsed = now - self.created
        left = self.queue_seconds - elapsed
        if left > 0:
            return {
                "taskId": self.task_id,
                "status": "waiting",
                "progress": 0,
                "etaRelative": 0,
                # Its place in a queue that lets one task start every ADMIT_EVERY seconds.
                "lastQueueRemaining": max(1, math.ceil(left / ADMIT_EVERY)),
            }
        fraction = (elapsed - self.queue_seconds) / self.run_seconds
        if self.fail_at is not None and fraction >= self.fail_at:
            label, step, max_steps, progress = node_at(self.fail_at)
            return {
                "taskId": self.task_id,
                "status": "failed",
                "progress": progress,
                "etaRelative": 0,
                "message": f"Error occurred when executing {label}: CUDA out of memory",
                "state": {"step": step, "maxSteps": max_steps, "nodeLabel": label},
            }
        if fraction >= 1:
            return {
                "taskId": self.task_id,
                "status": "succeeded",
                "progress": 1,
                "etaRelative": 0,
                "message": "Prompt executed",
            }
        label, step, max_steps, progress = node_at(fraction)
        return {
            "taskId": self.task_id,
            "status": "running",
            "progress": progress,
            "etaRelative": round(self.run_seconds * (1 - fraction), 6),
            "message": f"Executing node {label}",
            "state": {"step": step, "maxSteps": max_steps, "nodeLabel": label},
        }

    def result(self) -> dict[str, Any]:
        """What `comfy_get_result` answers: image URLs and the workflow's output."""
        seed = int(hashlib.sha256(self.task_id.encode()).hexdigest()[:8], 16)
        return {"images": [f"/sim/images/{self.task_id}.svg"], "result": {"seed": seed}}


def node_at(fraction: float) -> tuple[str, int, int, float]:
    """The node running at a fraction of the run: label, step (1-based), its steps, progress."""
    done = min(int(fraction * TOTAL_STEPS), TOTAL_STEPS - 1)
    before = 0
    for label, steps in WORKFLOW:
        if done < before + steps:
            return label, done - before + 1, steps, round(done / TOTAL_STEPS, 8)
        before += steps
    raise AssertionError("unreachable")


@dataclass
class Faults:
    """How often the upstream misbehaves, plus a script of faults for the next calls."""

    latency: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    hang_seconds: float = 30.0
    retry_after: float = 1.0
    script: deque[str] = field(default_factory=deque)

    def draw(self, rng: random.Random) -> str | None:
        if self.script:
            kind = self.script.popleft()
            return None if kind == "ok" else kind
        roll = rng.random()
        for kind, rate in zip(
            FAULT_KINDS,
            (self.error_rate, self.throttle_rate, self.timeout_rate, self.malformed_rate),
            strict=True,
        ):
            if roll < rate:
                return kind
            roll -= rate
        return None


def not_found(task_id: str | None) -> Response:
    return JSONResponse(
        envelope(None, sub_err=NOT_FOUND_CODE, message=f"Cannot find task:{task_id}")
    )


def envelope(
    data: Any, *, sub_err: str | None = None, message: str | None = None
) -> dict[str, Any]:
    return {
        "status": 20 if sub_err else 10,
        "apiInvokeId": "i_" + secrets.token_hex(12),
        "data": data,
        "subErrCode": sub_err,
        "subErrMessage": message,
        "errCode": None,
        "errMessage": None,
    }


class Simulator:
    def __init__(
        self,
        *,
        fail_rate: float = 0.1,
        faults: Faults | None = None,
        credentials: dict[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        """`credentials` maps AccessKey IDs to secrets: given, every call must be signed.

        `seed` makes outcomes and faults repeatable. The simulator draws from its own
        `random.Random`, never the global one that tests (Hypothesis) may be drawing from.
        """
        self.fail_rate = fail_rate
        self.random = random.Random(seed)
        self.queue_back = 0.0  # when the last task that joined the back leaves the queue
        self.credentials = credentials
        self.nonces = NonceCache()
        self.refused: Counter[str] = Counter()
        self.faults = faults or Faults()
        self.tasks: dict[str, SimTask] = {}
        self.calls: Counter[str] = Counter()
        # Which AccessKey ID polled each task last, and how often that changed: tells
        # tests whether two relays of a cluster ever polled one task by turns.
        self.last_caller: dict[str, str] = {}
        self.handovers: Counter[str] = Counter()
        self.states: Counter[str] = Counter()
        self.in_flight = 0
        self.app = Starlette(
            routes=[
                Route("/scc/comfy_get_progress", self.get_progress, methods=["POST"]),
                Route("/scc/comfy_get_result", self.get_result, methods=["POST"]),
                Route("/healthz", self.get_health, methods=["GET"]),
                *self.control_routes(),
            ]
        )

    def control_routes(self) -> list[Route]:
        """The simulator's own routes, which the relay also serves when it embeds it."""
        return [
            Route("/sim/tasks", self.post_task, methods=["POST"]),
            Route("/sim/stats", self.get_stats, methods=["GET"]),
            Route("/sim/faults", self.post_faults, methods=["POST"]),
            Route("/sim/images/{task_id}.svg", self.get_image, methods=["GET"]),
        ]

    def start_task(
        self, *, queue: float | None = None, duration: float = 20.0, fail: bool | None = None
    ) -> SimTask:
        """Start a task that waits `queue` seconds (None: joins the back of the queue),
        runs `duration` seconds and fails when `fail` says (None: at the fail rate)."""
        if len(self.tasks) >= MAX_TASKS:
            self.tasks.pop(next(iter(self.tasks)))
        now = time.monotonic()
        if queue is None:
            queue = max(ADMIT_EVERY, self.queue_back + ADMIT_EVERY - now)
            self.queue_back = now + queue
        if fail is None:
            fail = self.random.random() < self.fail_rate
        task = SimTask(
            # Not from self.random: IDs stay unique across simulators seeded alike.
            task_id=secrets.token_hex(13)[:25],
            created=now,
            queue_seconds=queue,
            run_seconds=duration,
            fail_at=self.random.uniform(0.3, 0.8) if fail else None,
        )
        self.tasks[task.task_id] = task
        return task

    # -- the upstream API -------------------------------------------------------------

    async def get_progress(self, request: Request) -> Response:
        task_id, fault = await self._begin_call(request)
        try:
            if fault is not None:
                return await self._misbehave(fault)
            task = self.tasks.get(task_id or "")
            if task is None:
                return not_found(task_id)
            state = task.state(time.monotonic())
            self.states[state["status"]] += 1
            return JSONResponse(envelope(state))
        finally:
            self.in_flight -= 1

    async def get_result(self, request: Request) -> Response:
        task_id, fault = await self._begin_call(request)
        try:
            if fault is not None:
                return await self._misbehave(fault)
            task = self.tasks.get(task_id or "")
            if task is None:
                return not_found(task_id)
            return JSONResponse(envelope(task.result()))
        finally:
            self.in_flight -= 1

    async def _begin_call(self, request: Request) -> tuple[str | None, str | None]:
        """Count the call and decide its fate: a fault, a refused signature, or an answer."""
        self.in_flight += 1
        raw = await request.body()
        if self.credentials is not None:
            error = verify_request(
                "POST",
                request.url.path,
                request.headers,
                raw,
                self.credentials,
                time.time(),
                self.nonces,
            )
            if error is not None:
                self.refused[error.split(",")[0]] += 1
                return "", "refused:" + error
        try:
            body = json.loads(raw)
            task_id = body.get("taskId") if isinstance(body, dict) else None
        except ValueError:
            task_id = None
        task_key = task_id if isinstance(task_id, str) else ""
        self.calls[task_key] += 1
        caller = request.headers.get("x-ca-key", "")
        if self.last_caller.setdefault(task_key, caller) != caller:
            self.last_caller[task_key] = caller
            self.handovers[task_key] += 1
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        return task_key, self.faults.draw(self.random)

    async def _misbehave(self, fault: str) -> Response:
        if fault.startswith("refused:"):
            # The gateway's way: an HTTP error whose reason is in X-Ca-Error-Message.
            message = fault.removeprefix("refused:")
            headers = {"X-Ca-Error-Message": message.replace("\n", "#")}
            return Response(status_code=error_status(message), headers=headers)
        if fault == "throttle":
            headers = {"Retry-After": f"{self.faults.retry_after:g}"}
            return JSONResponse({"message": "Too Many Requests"}, status_code=429, headers=headers)
        if fault == "timeout":
            await asyncio.sleep(self.faults.hang_seconds)
        if fault == "malformed":
            return Response(b"\xff<html>gateway hiccup", media_type="text/html")
        return JSONResponse({"message": "Internal Server Error"}, status_code=500)

    # -- control --------------------------------------------------------------------

    async def post_task(self, request: Request) -> Response:
        try:
            options = json.loads(await request.body() or b"{}")
            if not isinstance(options, dict):
                raise ValueError("body must be a JSON object")
            queue = seconds(options.get("queue"), "queue")
            duration = seconds(options.get("duration", 20.0), "duration")
            fail = options.get("fail")
            if duration is None or not (
                (queue is None or 0 <= queue <= 3600) and 0 < duration <= 3600
            ):
                raise ValueError("queue must be 0-3600 s and duration 0-3600 s")
            if fail is not None and not isinstance(fail, bool):
                raise ValueError("fail must be true, false or absent")
        except (ValueError, TypeError) as exc:
            return JSONResponse({"code": "bad_request", "message": str(exc)}, status_code=400)
        task = self.start_task(queue=queue, duration=duration, fail=fail)
        return JSONResponse({"taskId": task.task_id}, status_code=201)

    async def get_health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "calls": dict(self.calls),
                "total": sum(self.calls.values()),
                "byStatus": dict(self.states),
                "inFlight": self.in_flight,
                "refused": dict(self.refused),
            }
        )

    async def post_faults(self, request: Request) -> Response:
        try:
            options = json.loads(await request.body() or b"{}")
            if not isinstance(options, dict):
                raise ValueError("body must be a JSON object")
            script = options.pop("script", None)
            for name, value in options.items():
                if name not in Faults.__dataclass_fields__ or name == "script":
                    raise ValueError(f"unknown fault setting {name!r}")
                if seconds(value, name) is None or value < 0:
                    raise ValueError(f"{name} must be a number >= 0")
            if script is not None and (
                not isinstance(script, list) or any(s not in (*FAULT_KINDS, "ok") for s in script)
            ):
                raise ValueError(f"script must be a list of ok, {', '.join(FAULT_KINDS)}")
        except ValueError as exc:
            return JSONResponse({"code": "bad_request", "message": str(exc)}, status_code=400)
        for name, value in options.items():
            setattr(self.faults, name, float(value))
        if script is not None:
            self.faults.script = deque(script)
        return JSONResponse({"ok": True})

    async def get_image(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        if task_id not in self.tasks:
            return Response(status_code=404)
        hue = sum(task_id.encode()) * 37 % 360
        svg = IMAGE_SVG.format(hue=hue, hue2=(hue + 120) % 360, hue3=(hue + 60) % 360)
        return Response(svg, media_type="image/svg+xml")
