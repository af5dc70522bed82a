"""Bad input from every side, drawn by hypothesis, against one real relay for the whole module.

Browsers send task IDs, query strings, `Last-Event-ID` headers and WebSocket frames; the
upstream sends bodies. None of them, however wrong, may cost a 500, a crashed poll loop, a
dead socket for someone else, or an upstream call for an ID the relay should have refused.

The relay polls a stand-in upstream: it answers from a real Simulator, except for the task
IDs a test scripts, which get the test's bodies first and a sane final state after them.
Hypothesis tests here are plain functions (pytest-asyncio gives every async test its own
loop): they drive HTTP with a sync httpx client and run their WebSocket and async work with
`asyncio.run`.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed

from relay.app import create_app
from relay.simulator import Simulator, envelope
from relay.upstream import UpstreamError, read_envelope

from .conftest import FAST
from .servers import ThreadServer

TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_SEQ = (1 << 63) - 1
WS_LIMIT = 64 * 1024  # the relay's (uvicorn's) WebSocket message limit, in bytes
ERROR_CODES = {"invalid_task_id", "bad_request", "too_many_tasks", "task_not_found"}

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


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes) -> Any:
    """Parse as RFC 8259 JSON, as a browser's JSON.parse would: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=reject_constant)


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
    """The module's servers and clients (a plain class: hypothesis prints it by its repr)."""

    def __init__(
        self,
        relay: ThreadServer,
        standin: StandIn,
        long_task: str,
        ended_task: str,
        http: httpx.Client,
    ) -> None:
        self.relay = relay
        self.standin = standin
        self.long_task = long_task  # runs for an hour: always has a state, never ends
        self.ended_task = ended_task  # ended before the tests start; its final state is kept
        self.http = http
        self.serial = itertools.count()

    def __repr__(self) -> str:
        return f"Stage(relay={self.relay.url})"

    def fresh_task_id(self) -> str:
        return f"fuzz-{next(self.serial)}-{time.monotonic_ns()}"


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
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
        assert answer.events and answer.events[-1][0] == "end", answer
        yield Stage(relay, standin, long_task, ended_task, http)
    finally:
        http.close()
        relay.stop()
        upstream.stop()


# -- small clients --------------------------------------------------------------------------------


LINE_END = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """A text/event-stream parser by the SSE spec: lines end at CRLF, LF or CR only (httpx's
    iter_lines also splits at U+0085, U+2028 and other characters that are data in SSE)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # strict: the relay sends UTF-8
        self.buffer = ""
        self.fields: dict[str, str] = {}

    def feed(self, chunk: bytes, final: bool = False) -> list[tuple[str, Any, str | None]]:
        """Events completed by this chunk: (event, data parsed as strict JSON, id)."""
        self.buffer += self.decoder.decode(chunk, final)
        events: list[tuple[str, Any, str | None]] = []
        while (match := LINE_END.search(self.buffer)) is not None:
            if match.group() == "\r" and match.end() == len(self.buffer) and not final:
                break  # a CR at the end may be half of a CRLF
            line, self.buffer = self.buffer[: match.start()], self.buffer[match.end() :]
            if line == "":
                if "data" in self.fields:
                    data = strict_json(self.fields["data"])
                    events.append(
                        (self.fields.get("event", "message"), data, self.fields.get("id"))
                    )
                self.fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data" and "data" in self.fields:
                    value = self.fields["data"] + "\n" + value
                self.fields[name] = value
        return events


@dataclass
class Answer:
    """An HTTP answer: status, content type, JSON body (non-streams), and SSE events read."""

    status: int
    content_type: str
    body: Any = None
    raw: bytes = b""
    events: list[tuple[str, Any, str | None]] = field(default_factory=list)


def read_stream(
    client: httpx.Client,
    url: str,
    headers: dict[str, Any] | None = None,
    max_events: int = 1,
    time_limit: float = 5.0,
) -> Answer:
    """GET a URL; for an SSE stream read up to `max_events` events (strict JSON) and leave."""
    deadline = time.monotonic() + time_limit
    with client.stream("GET", url, headers=headers) as response:
        answer = Answer(response.status_code, response.headers.get("content-type", ""))
        if not answer.content_type.startswith("text/event-stream"):
            answer.raw = response.read()
            if answer.content_type.startswith("application/json"):
                answer.body = strict_json(answer.raw)
            return answer
        parser = SSEParser()
        for chunk in response.iter_bytes():
            answer.events.extend(parser.feed(chunk))
            if len(answer.events) >= max_events or time.monotonic() > deadline:
                del answer.events[max_events:]
                break
        else:
            answer.events.extend(parser.feed(b"", final=True))
    return answer


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


def path_segment(task_id: str) -> str:
    """Percent-encode everything, dots too, so no client or server reads the ID as a path.

    A lone surrogate goes out as the bytes it would have in UTF-16-minded clients
    (invalid UTF-8), which the relay must refuse like any other bad ID.
    """
    return quote(task_id, safe="", errors="surrogatepass").replace(".", "%2E")


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
any_characters = st.characters(exclude_categories=())  # lone surrogates included
valid_task_ids = st.from_regex(TASK_ID, fullmatch=True)
task_id_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="ab/._-%?#&=~ \\", max_size=12),
    valid_task_ids,
    st.integers(0, 400).map(lambda n: "a" * n),
    st.text(alphabet=st.characters(min_codepoint=0x80), min_size=1, max_size=20),
)


# -- task IDs in the path -------------------------------------------------------------------------


@FUZZ
@given(task_id=task_id_texts)
@example(task_id="")
@example(task_id="a/b")
@example(task_id="a/events")
@example(task_id=".")
@example(task_id="..")
@example(task_id="x" * 128)
@example(task_id="x" * 129)
@example(task_id="é")
@example(task_id="\n")
@example(task_id="a\nb")
@example(task_id="\ud800")
def test_invalid_task_ids_get_a_json_4xx_and_never_reach_the_upstream(
    stage: Stage, task_id: str
) -> None:
    base = f"{stage.relay.url}/v1/tasks/{path_segment(task_id)}"
    for url in (base, base + "/events"):
        calls_before = stage.standin.total
        answer = read_stream(stage.http, url)
        if is_valid_task_id(task_id):
            # A well-formed but unknown ID: one upstream lookup, then task_not_found.
            if answer.status == 200 and answer.events:
                assert answer.events[0][0] == "error", answer
                assert answer.events[0][1]["code"] == "task_not_found", answer
            else:
                assert_json_error(answer, {"task_not_found"})
            continue
        assert_json_error(answer, {"invalid_task_id"})
        assert answer.body["code"] == "invalid_task_id", answer
        assert stage.standin.calls[task_id] == 0
        assert stage.standin.total == calls_before, f"{task_id!r} reached the upstream"
    assert all(is_valid_task_id(name) for name in stage.standin.calls), "an invalid ID was polled"


# -- query strings on the multiplexed stream ------------------------------------------------------

param_names = st.sampled_from(["taskId", "taskId", "taskId", "taskid", "task_id", "taskId[]", ""])
param_pairs = st.lists(st.tuples(param_names | st.text(max_size=10), task_id_texts), max_size=40)
raw_queries = st.lists(
    st.sampled_from([*"taskId=&%;+?/:,0123456789abcdefABCDEF-_. ", "%FF", "%2", "é"]), max_size=300
).map("".join)


def encode_pairs(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{url_part(k)}={url_part(v)}" for k, v in pairs)


def url_part(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")


queries = st.one_of(
    param_pairs.map(encode_pairs),
    st.tuples(task_id_texts, st.integers(1, 3000)).map(
        lambda t: "&".join([f"taskId={url_part(t[0])}"] * t[1])
    ),
    st.lists(valid_task_ids, min_size=30, max_size=40).map(
        lambda ids: encode_pairs([("taskId", i) for i in ids])
    ),
    raw_queries,
).map(lambda query: query[:60_000])  # httpx refuses URLs over 64 KiB


@FUZZ
@given(query=queries)
@example(query="")
@example(query="taskId=")
@example(query="taskId=&taskId=")
@example(query="&&&===")
def test_any_query_string_on_the_multiplexed_stream_is_answered_without_a_500(
    stage: Stage, query: str
) -> None:
    answer = read_stream(stage.http, f"{stage.relay.url}/v1/events?{query}", max_events=50)
    assert answer.status < 500, answer
    if answer.status == 200:
        assert answer.content_type.startswith("text/event-stream"), answer
        for kind, data, _ in answer.events:
            assert kind in ("error", "snapshot", "patch", "end"), answer
            assert isinstance(data, dict) and set(data) == {"taskId", "data"}, answer
            if kind == "error":
                assert data["data"]["code"] in ("invalid_task_id", "task_not_found"), answer
    else:
        # No task of the list can be watched: one HTTP error, so EventSource stops.
        assert_json_error(
            answer, {"bad_request", "too_many_tasks", "invalid_task_id", "task_not_found"}
        )


# -- Last-Event-ID garbage ------------------------------------------------------------------------

header_bytes = st.sampled_from(
    [bytes([b]) for b in range(0x21, 0x7F)] + [bytes([b]) for b in range(0x80, 0x100)] + [b" "]
)
last_event_ids = st.one_of(
    st.lists(header_bytes, max_size=200).map(lambda bs: b"".join(bs).strip()),
    st.integers(1, 8000).map(lambda n: b"9" * n),
    st.integers(max_value=-1).map(lambda n: str(n).encode()),
    st.integers(min_value=MAX_SEQ - 2, max_value=MAX_SEQ * 4).map(lambda n: str(n).encode()),
    st.integers(1, 2000).map(lambda n: b"," * n),
    st.integers(1, 2000).map(lambda n: b":" * n),
    st.lists(st.tuples(task_id_texts, st.integers()), max_size=50).map(
        lambda pairs: ",".join(f"{t}:{s}" for t, s in pairs).encode("utf-8", "replace")
    ),
    st.text(max_size=50).map(lambda s: s.encode("utf-8")),
).map(lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b != 0x7F).strip())
# (Control characters are not HTTP: uvicorn refuses them before the relay sees the request.)


def is_decimal(raw: bytes) -> bool:
    return raw.strip().isdigit()


@FUZZ
@given(last_event_id=last_event_ids)
@example(last_event_id=b"9" * 5000)
@example(last_event_id=b"-1")
@example(last_event_id=b"\xff\xfe\x80")
@example(last_event_id=b"a:" + b"9" * 5000)
def test_garbage_last_event_id_gets_a_snapshot_or_a_204_never_a_500(
    stage: Stage, last_event_id: bytes
) -> None:
    headers = {"Last-Event-ID": last_event_id}
    relay = stage.relay.url
    running = read_stream(stage.http, f"{relay}/v1/tasks/{stage.long_task}/events", headers)
    assert running.status == 200, running
    # A number the relay happens to remember would get a patch; garbage gets a snapshot.
    expected = {"snapshot", "patch"} if is_decimal(last_event_id) else {"snapshot"}
    assert running.events and running.events[0][0] in expected, running

    ended = read_stream(stage.http, f"{relay}/v1/tasks/{stage.ended_task}/events", headers)
    if is_decimal(last_event_id):
        assert ended.status in (200, 204), ended
    else:
        assert ended.status == 200, ended
    if ended.status == 200:
        assert ended.events and ended.events[0][0] in ("snapshot", "patch"), ended

    url = f"{relay}/v1/events?taskId={stage.long_task}&taskId={stage.ended_task}"
    many = read_stream(stage.http, url, headers)
    assert many.status == 200, many
    assert many.events and many.events[0][0] in ("snapshot", "patch"), many


# -- WebSocket frames -----------------------------------------------------------------------------

bad_types = json_values.filter(lambda v: v not in ("subscribe", "unsubscribe"))
bad_task_ids = st.one_of(
    json_values.filter(lambda v: not isinstance(v, str)),
    st.text(alphabet=any_characters, max_size=40).filter(lambda s: not is_valid_task_id(s)),
    st.integers(129, 2000).map(lambda n: "a" * n),
)
bad_last_seqs = st.one_of(
    st.integers(max_value=-1),
    st.floats().filter(lambda f: not (math.isfinite(f) and f.is_integer())),
    st.text(max_size=20),
    st.booleans(),
    st.lists(json_values, max_size=3),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)
message_types = st.sampled_from(["subscribe", "unsubscribe"])


def frame_of(value: Any) -> str:
    return json.dumps(value)  # ASCII with \u escapes: lone surrogates travel as escapes


def sized(prefix: str, suffix: str, size: int) -> str:
    return prefix + "x" * max(0, size - len(prefix) - len(suffix)) + suffix


bad_frames: st.SearchStrategy[str | bytes] = st.one_of(
    json_values.filter(lambda v: not isinstance(v, dict)).map(frame_of),
    st.fixed_dictionaries(
        {"type": bad_types},
        optional={"taskId": valid_task_ids | json_values, "lastSeq": json_values},
    ).map(frame_of),
    st.dictionaries(st.sampled_from(["taskId", "lastSeq", "Type", "TYPE"]), json_values).map(
        frame_of
    ),
    st.fixed_dictionaries({"type": message_types, "taskId": bad_task_ids}).map(frame_of),
    st.fixed_dictionaries({"type": message_types}, optional={"lastSeq": st.integers(0, 10)}).map(
        frame_of
    ),
    st.fixed_dictionaries(
        {"type": st.just("subscribe"), "taskId": valid_task_ids, "lastSeq": bad_last_seqs}
    ).map(frame_of),
    st.integers(1, WS_LIMIT // 2).map(lambda n: "[" * n + "]" * n),
    st.integers(1, WS_LIMIT // 6).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(1000, WS_LIMIT).map(lambda n: sized('{"type":"subscribe","taskId":"', '"}', n)),
    st.integers(1000, WS_LIMIT).map(lambda n: b"\x00" * n),
)


def is_well_formed(frame: str | bytes) -> bool:
    """A frame SPEC calls a valid message: a JSON object with a known type, a valid task ID
    and an optional non-negative whole lastSeq."""
    if isinstance(frame, bytes):
        return False
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
        return False
    last_seq = message.get("lastSeq")
    return is_valid_task_id(message.get("taskId")) and (
        last_seq is None
        or (isinstance(last_seq, int) and not isinstance(last_seq, bool) and last_seq >= 0)
    )


async def recv_json(socket: Any, timeout: float = 5.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(socket.recv(), timeout)
    message = strict_json(frame)
    assert isinstance(message, dict), message
    return message


class ThreadWatcher:
    """A well-behaved WebSocket client on its own thread and loop, recording every frame."""

    def __init__(self, ws_url: str, task_id: str) -> None:
        self.ws_url = ws_url
        self.task_id = task_id
        self.frames: list[dict[str, Any]] = []
        self.failure: BaseException | None = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.watch()), daemon=True)

    def __enter__(self) -> ThreadWatcher:
        self.thread.start()
        assert self.ready.wait(10), "the watcher got no snapshot"
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(10)

    async def watch(self) -> None:
        try:
            async with websockets.connect(f"{self.ws_url}/v1/ws") as socket:
                await socket.send(json.dumps({"type": "subscribe", "taskId": self.task_id}))
                while not self.stopping.is_set():
                    try:
                        frame = await asyncio.wait_for(socket.recv(), 0.2)
                    except TimeoutError:
                        continue
                    self.frames.append(strict_json(frame))
                    self.ready.set()
        except BaseException as exc:  # recorded, and asserted on by the test
            self.failure = exc
            self.ready.set()


async def fuzz_socket(ws_url: str, frames: list[str | bytes], task_id: str) -> None:
    async with websockets.connect(f"{ws_url}/v1/ws", max_size=None) as socket:
        for frame in frames:
            await socket.send(frame)
            reply = await recv_json(socket)
            assert reply["type"] == "error", (frame[:200], reply)
            assert "seq" not in reply, reply
            assert reply["data"]["code"] in ("bad_request", "invalid_task_id"), (frame[:200], reply)
            assert reply["data"]["retrying"] is False, reply
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        reply = await recv_json(socket)
        assert reply["type"] == "snapshot" and reply["taskId"] == task_id, reply


def test_bad_websocket_frames_get_error_replies_and_nobody_loses_an_update(
    stage: Stage,
) -> None:
    started = time.monotonic()
    with ThreadWatcher(stage.relay.ws_url, stage.long_task) as watcher:

        @FUZZ
        @given(frames=st.lists(bad_frames, min_size=1, max_size=6))
        @example(frames=['{"type":"subscribe","taskId":"\\ud800"}'])
        @example(frames=['{"type":"subscribe","taskId":"' + "a" * 129 + '"}'])
        @example(frames=[sized('{"type":"subscribe","taskId":"', '"}', WS_LIMIT)])
        @example(frames=[b"\xff" * WS_LIMIT, "[" * 30000 + "]" * 30000])
        def fuzz(frames: list[str | bytes]) -> None:
            assume(not any(is_well_formed(frame) for frame in frames))
            asyncio.run(fuzz_socket(stage.relay.ws_url, frames, stage.long_task))

        fuzz()
        time.sleep(0.5)  # the watcher sees the updates of the last examples too
    elapsed = time.monotonic() - started
    assert watcher.failure is None, repr(watcher.failure)
    frames = watcher.frames
    assert frames[0]["type"] == "snapshot", frames[0]
    assert all(f["type"] == "patch" and f["taskId"] == stage.long_task for f in frames[1:]), [
        f for f in frames if f["type"] != "patch"
    ][:3]
    seqs = [f["seq"] for f in frames]
    gaps = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
    assert not gaps, f"the watcher missed updates: {gaps[:5]}"
    # The loop polls every 0.1 s ±10 % and the simulated ETA moves with every poll.
    assert len(frames) >= elapsed / 0.11 * 0.5, (len(frames), elapsed)


@settings(FUZZ, max_examples=8)
@given(size=st.integers(WS_LIMIT + 1, 4 * WS_LIMIT), binary=st.booleans())
@example(size=WS_LIMIT + 1, binary=False)
def test_frames_over_64_kib_close_the_socket_with_1009(
    stage: Stage, size: int, binary: bool
) -> None:
    async def send_oversized() -> int | None:
        async with websockets.connect(f"{stage.relay.ws_url}/v1/ws", max_size=None) as socket:
            frame: str | bytes = b"x" * size if binary else sized('{"type":"', '"}', size)
            await socket.send(frame)
            try:
                await asyncio.wait_for(socket.recv(), 5)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd is not None else None
            return None

    assert asyncio.run(send_oversized()) == 1009


# -- upstream bodies ------------------------------------------------------------------------------


def is_terminal_or_final(body: Any) -> bool:
    """Bodies that would legitimately end the task early; the body test keeps to the others."""
    if not isinstance(body, dict):
        return False
    if body.get("subErrCode") == "B_COMPUTING_CanNotFindTask":
        return True
    data = body.get("data")
    return (
        body.get("status") == 10
        and isinstance(data, dict)
        and data.get("status") in ("succeeded", "failed")
    )


state_data = st.dictionaries(st.text(max_size=10), json_values, max_size=6).flatmap(
    lambda extra: st.fixed_dictionaries(
        {"status": st.sampled_from(["waiting", "running"]) | json_values},
        optional={"progress": json_values, "lastQueueRemaining": json_values, "state": json_values},
    ).map(lambda core: {**extra, **core})
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "status": st.just(10) | st.just(20) | json_values,
        "data": state_data | json_values,
        "subErrCode": st.none() | st.text(max_size=30),
        "errCode": json_values,
        "apiInvokeId": json_values,
    },
).filter(lambda body: not is_terminal_or_final(body))
upstream_bodies = st.one_of(
    envelopes.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=500),
    st.text(max_size=200).map(lambda text: text.encode("utf-8")),
    st.integers(1, 3 << 19).map(
        lambda n: b'{"status":10,"data":{"status":"running","blob":"' + b"y" * n + b'"}}'
    ),
    st.just(b"\xff\xfe{\x00"),
    st.just(b'{"status":10,"data":{"status":"running","x":"\xff\xfe"}}'),
)
replies = st.builds(
    Reply,
    body=upstream_bodies,
    status=st.sampled_from([200, 200, 200, 200, 404, 500, 502, 503]),
    media_type=st.sampled_from(["application/json", "text/html", "application/octet-stream"]),
)


@dataclass
class Seen:
    """What one subscriber saw of one task: the state it rebuilt, its errors, its end."""

    state: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended: str | None = None

    def apply(self, kind: str, data: Any) -> None:
        if kind == "snapshot":
            self.state = data
        elif kind == "patch":
            assert self.state is not None, "patch before snapshot"
            self.state = merge(self.state, data)
        elif kind == "error":
            self.errors.append(data)
        elif kind == "end":
            self.ended = data["status"]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396, written here so the test does not trust relay.patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


async def sse_follow(client: httpx.AsyncClient, url: str) -> AsyncIterator[tuple[str, Any]]:
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        parser = SSEParser()
        async for chunk in response.aiter_bytes():
            for kind, data, _ in parser.feed(chunk):
                yield kind, data
        for kind, data, _ in parser.feed(b"", final=True):
            yield kind, data


async def follow_sse(base: str, task_id: str) -> Seen:
    seen = Seen()
    async with httpx.AsyncClient(timeout=10) as client:
        async for kind, data in sse_follow(client, f"{base}/v1/tasks/{task_id}/events"):
            seen.apply(kind, data)
    return seen


async def follow_ws(ws_base: str, task_id: str) -> Seen:
    seen = Seen()
    async with websockets.connect(f"{ws_base}/v1/ws", max_size=None) as socket:
        await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
        while True:
            frame = await recv_json(socket, 10)
            seen.apply(frame["type"], frame["data"])
            if frame["type"] == "end" or (
                frame["type"] == "error" and not frame["data"]["retrying"]
            ):
                return seen


async def follow_both(stage: Stage, task_id: str) -> list[Seen]:
    return list(
        await asyncio.wait_for(
            asyncio.gather(
                follow_sse(stage.relay.url, task_id), follow_ws(stage.relay.ws_url, task_id)
            ),
            20,
        )
    )


def assert_recovered(stage: Stage, task_id: str, seen: list[Seen]) -> None:
    expected = {**sane_state(task_id), "result": SANE_RESULT}
    for subscriber in seen:
        for error in subscriber.errors:
            assert error["code"] == "upstream_unavailable" and error["retrying"] is True, error
        assert subscriber.ended == "succeeded", subscriber
        assert subscriber.state == expected, subscriber


@settings(FUZZ, max_examples=40)
@given(script=st.lists(replies, min_size=1, max_size=3))
@example(script=[Reply(b"", 200), Reply(b"null"), Reply(b"<html>", 502, "text/html")])
@example(
    script=[Reply(b'{"status":10,"data":{"status":"running","blob":"' + b"y" * (2 << 20) + b'"}}')]
)
def test_bad_upstream_bodies_are_retried_and_the_final_state_arrives(
    stage: Stage, script: list[Reply]
) -> None:
    task_id = stage.fresh_task_id()
    stage.standin.script(task_id, script)
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))
    assert stage.standin.calls[task_id] >= len(script) + 1


@settings(FUZZ, max_examples=10)
@given(
    value=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]),
    where=st.sampled_from(["progress", "etaRelative", "state"]),
)
def test_upstream_nan_or_infinity_never_reaches_subscribers_as_invalid_json(
    stage: Stage, value: str, where: str
) -> None:
    task_id = stage.fresh_task_id()
    inner = f'{{"step":{value}}}' if where == "state" else value
    body = f'{{"status":10,"data":{{"taskId":"{task_id}","status":"running","{where}":{inner}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())] * 3)
    # strict_json fails the test on any frame a browser's JSON.parse would reject.
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


@settings(FUZZ, max_examples=5)
@given(text=st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3))
def test_upstream_lone_surrogates_do_not_break_the_streams(stage: Stage, text: str) -> None:
    task_id = stage.fresh_task_id()
    message = json.dumps(text)  # "\\ud800": valid JSON text, not encodable as UTF-8
    body = f'{{"status":10,"data":{{"status":"running","message":{message}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())])
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


@settings(FUZZ, max_examples=12)
@given(depth=st.integers(300, 200_000), kind=st.sampled_from(["object", "array"]))
@example(depth=600, kind="object")
@example(depth=100_000, kind="array")
def test_deeply_nested_upstream_bodies_are_retried_not_fatal(
    stage: Stage, depth: int, kind: str
) -> None:
    task_id = stage.fresh_task_id()
    nested = '{"a":' * depth + "1" + "}" * depth if kind == "object" else "[" * depth + "]" * depth
    body = f'{{"status":10,"data":{{"status":"running","deep":{nested}}}}}'
    stage.standin.script(task_id, [Reply(body.encode())])
    assert_recovered(stage, task_id, asyncio.run(follow_both(stage, task_id)))


def test_the_relay_is_healthy_and_idle_after_the_fuzzing(stage: Stage) -> None:
    assert stage.http.get(f"{stage.relay.url}/healthz").json() == {"status": "ok"}
    wait_until_idle(stage)
    assert metric(stage.http, stage.relay.url, 'relay_subscribers{transport="sse"}') == 0
    assert metric(stage.http, stage.relay.url, 'relay_subscribers{transport="ws"}') == 0


# -- read_envelope, as a pure function ------------------------------------------------------------


def nest(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


envelope_inputs = st.one_of(
    json_values,
    envelopes,
    st.fixed_dictionaries({"status": st.just(10), "data": state_data}),
)


@settings(FUZZ, max_examples=200, report_multiple_bugs=False)
@given(
    body=envelope_inputs,
    deep=st.none() | st.tuples(st.integers(1, 1500), json_scalars),
    task_id=valid_task_ids,
)
@example(body={}, deep=(600, 1), task_id="t")
def test_read_envelope_returns_a_dict_or_raises_an_upstream_error(
    body: Any, deep: tuple[int, Any] | None, task_id: str
) -> None:
    """`deep` replaces the body with a valid envelope whose data nests `deep[0]` objects deep
    (built here, so that hypothesis never has to print it)."""
    if deep is not None:
        body = {"status": 10, "data": {"status": "running", "deep": nest(*deep)}}
    try:
        data = read_envelope(body, task_id)
    except UpstreamError:
        return
    assert isinstance(data, dict)
    assert None not in data.values()
