"""What the fuzz tests (tests/test_fuzz_*.py) share: a stand-in upstream, a stage of real
servers for each test module, the hypothesis settings and the strategies for task IDs and JSON.

Browsers send task IDs, query strings, `Last-Event-ID` headers and WebSocket frames; the
upstream sends bodies. None of them, however wrong, may cost a 500, a crashed poll loop, a
dead socket for someone else, or an upstream call for an ID the relay should have refused.

The relay polls a stand-in upstream: it answers from a real Simulator, except for the task
IDs a test scripts, which get the test's bodies first and a sane final state after them.
Hypothesis tests are plain functions (pytest-asyncio gives every async test its own loop):
they drive HTTP with a sync httpx client (clients.read_stream) and run their WebSocket and
async work with `asyncio.run`.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.app import create_app
from relay.simulator import Simulator, envelope

from .clients import Answer, read_stream
from .conftest import FAST
from .servers import ThreadServer

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the autouse sse-starlette flag reset only
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def is_valid_task_id(value: object) -> bool:
    """SPEC: 1 to 128 characters of [A-Za-z0-9_-]. Written here, not imported from relay/."""
    return isinstance(value, str) and TASK_ID.fullmatch(value) is not None


# -- the stand-in upstream ------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted upstream answer."""

    body: bytes
    status: int = 200
    media_type: str = "application/json"


def sane_state(task_id: str) -> dict[str, Any]:
    return {"taskId": task_id, "status": "succeeded", "progress": 1, "message": "done"}


SANE_RESULT = {"images": ["/img/fuzz.png"], "result": {"seed": 7}}


class StandIn:
    """The upstream the relay polls: the simulator, except for scripted task IDs."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.calls: Counter[str] = Counter()  # every call, by the task ID it named (or its repr)
        self.scripts: dict[str, deque[Reply]] = {}
        self.app = Starlette(
            routes=[
                Route("/scc/comfy_get_progress", self.progress, methods=["POST"]),
                Route("/scc/comfy_get_result", self.result, methods=["POST"]),
            ]
        )

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def script(self, task_id: str, replies: list[Reply]) -> None:
        self.scripts[task_id] = deque(replies)

    async def named(self, request: Request) -> str:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return "<not JSON>"
        task_id = body.get("taskId") if isinstance(body, dict) else None
        return task_id if isinstance(task_id, str) else repr(task_id)

    async def progress(self, request: Request) -> Response:
        task_id = await self.named(request)
        self.calls[task_id] += 1
        script = self.scripts.get(task_id)
        if script is None:
            return await self.simulator.get_progress(request)  # the body is cached on request
        if script:
            reply = script.popleft()
            return Response(reply.body, status_code=reply.status, media_type=reply.media_type)
        return JSONResponse(envelope(sane_state(task_id)))

    async def result(self, request: Request) -> Response:
        task_id = await self.named(request)
        if task_id in self.scripts:
            return JSONResponse(envelope(SANE_RESULT))
        return await self.simulator.get_result(request)


class Stage:
    """A test module's servers and clients (a plain class: hypothesis prints it by its repr)."""

    def __init__(
        self,
        relay: ThreadServer,
        standin: StandIn,
        long_task: str,
        ended_task: str,
        http: httpx.Client,
        upstream_url: str,
    ) -> None:
        self.relay = relay
        self.standin = standin
        self.upstream_url = upstream_url
        self.long_task = long_task  # runs for an hour: always has a state, never ends
        self.ended_task = ended_task  # ended before the tests start; its final state is kept
        self.http = http
        self.serial = itertools.count()

    def __repr__(self) -> str:
        return f"Stage(relay={self.relay.url})"

    def fresh_task_id(self) -> str:
        return f"fuzz-{next(self.serial)}-{time.monotonic_ns()}"


@contextmanager
def staged() -> Iterator[Stage]:
    """One real relay on a stand-in upstream, for a whole test module (its `stage` fixture)."""
    simulator = Simulator(fail_rate=0.0)
    standin = StandIn(simulator)
    upstream = ThreadServer(standin.app).start()
    relay_settings = replace(
        FAST,
        upstream_url=upstream.url,
        backoff_max=0.2,
        waiting_interval_max=0.3,
        request_timeout=2.0,
    )
    relay = ThreadServer(create_app(relay_settings)).start()
    long_task = simulator.start_task(queue=0, duration=3600, fail=False).task_id
    ended_task = simulator.start_task(queue=0, duration=0.2, fail=False).task_id
    http = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
    try:
        answer = read_stream(http, f"{relay.url}/v1/tasks/{ended_task}/events", max_events=100)
        assert answer.events and answer.events[-1].event == "end", answer
        yield Stage(relay, standin, long_task, ended_task, http, upstream.url)
    finally:
        http.close()
        relay.stop()
        upstream.stop()


# -- checks ---------------------------------------------------------------------------------------


def metric(client: httpx.Client, base: str, name: str) -> float:
    text = client.get(f"{base}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until_idle(stage: Stage, time_limit: float = 10.0) -> None:
    """Wait until the relay runs no poll loop (a bounded wait)."""
    deadline = time.monotonic() + time_limit
    while metric(stage.http, stage.relay.url, "relay_poll_loops") > 0:
        assert time.monotonic() < deadline, "poll loops did not stop"
        time.sleep(0.05)


def assert_healthy_and_idle(stage: Stage) -> None:
    """After a module's fuzzing: the relay answers, runs no poll loop and has no subscriber."""
    assert stage.http.get(f"{stage.relay.url}/healthz").json() == {"status": "ok"}
    wait_until_idle(stage)
    assert metric(stage.http, stage.relay.url, 'relay_subscribers{transport="sse"}') == 0
    assert metric(stage.http, stage.relay.url, 'relay_subscribers{transport="ws"}') == 0


def assert_json_error(answer: Answer, codes: set[str]) -> None:
    assert 400 <= answer.status < 500, answer
    assert answer.content_type.startswith("application/json"), answer
    body = answer.body
    assert isinstance(body, dict) and body.get("code") in codes, answer
    assert isinstance(body.get("message"), str) and body.get("retrying") is False, answer


# -- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
valid_task_ids = st.from_regex(TASK_ID, fullmatch=True)
task_id_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="ab/._-%?#&=~ \\", max_size=12),
    valid_task_ids,
    st.integers(0, 400).map(lambda n: "a" * n),
    st.text(alphabet=st.characters(min_codepoint=0x80), min_size=1, max_size=20),
)
