"""Follow a task from Python, for backends, scripts and notebooks; and `relay watch`.

    async with RelayClient("http://127.0.0.1:8000") as relay:
        async for state in relay.watch(task_id):
            print(state["status"], state.get("progress"))
        final = await relay.wait(task_id, timeout=600)

The client reads the one-task SSE stream (`GET /v1/tasks/{taskId}/events`, docs/protocol.md),
applies the merge patches, and hands over the whole state after every change. When the
connection drops or the relay restarts it reconnects by itself, after a bounded, jittered
backoff that honours the stream's `retry:` hint and a refusal's `Retry-After`, and resumes
with `Last-Event-ID`. Final errors become exceptions: `TaskNotFound`, `Unauthorized`, or
their base `RelayError`; `wait` raises `TaskFailed`, carrying the state, for a failed task.

It needs nothing but httpx: the event stream is parsed here, since the relay's events are
one-line JSON and a parser of the whole SSE grammar is a few dozen lines.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import json
import logging
import random
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from .. import __version__
from ..patch import apply_patch, same_json
from ..retry import backoff, parse_retry_after

State = dict[str, Any]
"""A task's state: the JSON object docs/protocol.md describes (`status`, `progress`, ...)."""

DEFAULT_URL = "http://127.0.0.1:8000"
# The relay comments every RELAY_PING_INTERVAL (15 s by default): a stream silent for three
# of those is taken for dead and reopened.
READ_TIMEOUT = 45.0
CONNECT_TIMEOUT = 10.0
# A server's own wait (Retry-After, `retry:`) is honoured up to this long.
LONGEST_SERVER_WAIT = 300.0
USER_AGENT = f"comfy-relay/{__version__} (relay.client)"

logger = logging.getLogger("relay.client")


class RelayError(Exception):
    """The relay refused or ended a subscription: `code` is the protocol's error code.

    `status` is the HTTP status when the refusal came before the stream opened, else None.
    `retrying` is what the relay said; the client has already retried what it could.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        task_id: str | None = None,
        status: int | None = None,
        retrying: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.task_id = task_id
        self.status = status
        self.retrying = retrying

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class TaskNotFound(RelayError):
    """The upstream does not know the task (`task_not_found`)."""


class Unauthorized(RelayError):
    """The token is missing, expired, forged or does not cover the task (`unauthorized`)."""


class TaskFailed(RelayError):
    """`wait` found the task `failed`; `state` is its final state."""

    def __init__(self, task_id: str, state: State) -> None:
        message = str(state.get("message") or f"task {task_id} failed")
        super().__init__("task_failed", message, task_id=task_id)
        self.state = state


class RelayUnavailable(RelayError):
    """No stream could be opened for `give_up_after` seconds in a row."""


ERRORS: dict[str, type[RelayError]] = {
    "task_not_found": TaskNotFound,
    "unauthorized": Unauthorized,
}


def error_from(
    data: object, task_id: str, status: int | None = None, reason: str = ""
) -> RelayError:
    """The exception for an `error` event's data or an HTTP error's body."""
    if isinstance(data, Mapping) and isinstance(data.get("code"), str):
        code = str(data["code"])
        message = str(data.get("message") or code)
        retrying = data.get("retrying") is True
    else:
        code = f"http_{status}" if status is not None else "bad_response"
        message = f"the relay answered {status} {reason}".strip()
        retrying = False
    kind = ERRORS.get(code, RelayError)
    return kind(code, message, task_id=task_id, status=status, retrying=retrying)


# -- the event stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerEvent:
    """One dispatched SSE event: its name, its data lines joined, and its `id` if it had one."""

    event: str
    data: str
    id: str | None


@dataclass
class EventStreamDecoder:
    """text/event-stream as the HTML standard parses it, fed bytes as they arrive.

    Lines end at CR, LF or CRLF; comments are skipped; `retry:` sets `retry` (milliseconds);
    an event is dispatched at a blank line, and one cut off by the end of the stream is not.
    """

    retry: int | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    _buffer: str = ""
    _started: bool = False
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        text = self._buffer + self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        # A CR at the end may be the first half of a CRLF split across chunks: keep it.
        held = "\r" if text.endswith("\r") else ""
        lines = text.removesuffix(held).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop() + held
        events: list[ServerEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            event = None
            if self._data:
                event = ServerEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None


def retry_after(response: httpx.Response) -> float | None:
    """A response's Retry-After in seconds, or None."""
    return parse_retry_after(response.headers.get("retry-after"))


def retryable(status: int) -> bool:
    """Statuses worth trying again: the relay at a cap, a proxy or a server in trouble."""
    return status in (408, 429) or status >= 500


# -- the client --------------------------------------------------------------------------------


class RelayClient:
    """A client of one relay. Use it as an async context manager, or call `aclose()`.

    It owns its httpx.AsyncClient unless given one (`http=`), which it then never closes.
    `token` is used for every call that does not pass its own. Reconnects wait about
    `backoff_initial` seconds, doubling with each failure in a row up to `backoff_max`,
    with jitter; a server's `retry:` or `Retry-After` is waited out first (up to five
    minutes). `give_up_after` seconds without being able to open a stream end a watch with
    `RelayUnavailable`; None retries for as long as the caller waits. A stream silent for
    `read_timeout` seconds is taken for dead; keep it above the relay's ping interval.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        http: httpx.AsyncClient | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        give_up_after: float | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.timeout = httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout)
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=self.timeout, headers={"User-Agent": USER_AGENT}
        )

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client, if this client made it."""
        if self._owns_http:
            await self.http.aclose()

    def _url(self, task_id: str, suffix: str = "") -> str:
        return f"{self.base_url}/v1/tasks/{quote(task_id, safe='')}{suffix}"

    def _params(self, token: str | None) -> dict[str, str]:
        token = token if token is not None else self.token
        return {"token": token} if token else {}

    def watch(
        self,
        task_id: str,
        *,
        token: str | None = None,
        seq: int | None = None,
        state: State | None = None,
        on_problem: Callable[[TaskWatch], None] | None = None,
    ) -> TaskWatch:
        """Follow a task: `async for state in client.watch(task_id)` yields the whole state
        after every change, and stops after the task's end.

        To carry on where an earlier watch stopped, pass its `seq` and `state` together.
        `on_problem` is called with the watch whenever its `problem` starts or ends, even
        while no state comes: a progress display can say what it is waiting for.
        """
        if (seq is None) != (state is None):
            raise ValueError("give seq and state together, or neither")
        return TaskWatch(self, task_id, token, seq, state, on_problem)

    # `timeout=` rather than asyncio.timeout(): one call, for scripts and notebooks.
    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        token: str | None = None,
    ) -> State:
        """The task's final state, once it has `succeeded` (with its `result`).

        Raises TaskFailed when it failed, TaskNotFound, Unauthorized or another RelayError
        when the relay refuses, and TimeoutError when `timeout` seconds pass first.
        """
        async with asyncio.timeout(timeout), self.watch(task_id, token=token) as watch:
            async for _ in watch:
                pass
        if watch.state is None:  # the relay ends a task only after its terminal state
            raise RelayError("bad_response", "the task ended without a state", task_id=task_id)
        if watch.ended == "failed":
            raise TaskFailed(task_id, watch.state)
        return watch.state

    async def state(self, task_id: str, *, token: str | None = None) -> State:
        """The task's current state, once (`GET /v1/tasks/{taskId}`); no retries."""
        response = await self.http.get(
            self._url(task_id), params=self._params(token), timeout=self.timeout
        )
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            raise error_from(body, task_id, response.status_code, response.reason_phrase)
        return body


class TaskWatch:
    """One task followed to its end, as an async iterator of whole states.

    Its attributes say where it is: `state` and `seq` (the latest state and its sequence
    number, to resume from later), `ended` (`succeeded` or `failed` once the task ended),
    `problem` (what is being retried, as an error's data: a `retrying: true` error from
    the relay, such as `upstream_unavailable`, until the next state; or, until a stream
    opens, why none could be: `relay_unavailable`, or a refusal such as `overloaded`),
    `connections` (streams opened) and `snapshots` (whole states received: after a
    reconnect the relay sends a patch when it remembers where the client was).
    Leaving `async with` (or `aclose()`) closes its stream.
    """

    def __init__(
        self,
        client: RelayClient,
        task_id: str,
        token: str | None,
        seq: int | None,
        state: State | None,
        on_problem: Callable[[TaskWatch], None] | None = None,
    ) -> None:
        self.client = client
        self.task_id = task_id
        self.token = token
        self.seq = seq
        self.state = state
        self.ended: str | None = None
        self.problem: dict[str, Any] | None = None
        self.connections = 0
        self.snapshots = 0
        self._retry: float | None = None  # the stream's `retry:` hint, in seconds
        self._failures = 0  # attempts in a row that opened no stream
        self._on_problem = on_problem
        self._states = self._follow()

    def __aiter__(self) -> TaskWatch:
        return self

    async def __anext__(self) -> State:
        return await anext(self._states)

    async def __aenter__(self) -> TaskWatch:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._states.aclose()

    async def _follow(self) -> AsyncGenerator[State, None]:
        client = self.client
        loop = asyncio.get_running_loop()
        last_open = loop.time()  # when a stream was last open, for give_up_after
        while True:
            told: float | None = None  # a refusal's Retry-After
            opened = False
            left = self._time_left(last_open, loop.time())
            try:
                async with client.http.stream(
                    "GET",
                    client._url(self.task_id, "/events"),
                    params=client._params(self.token),
                    headers=self._headers(),
                    timeout=self._timeout(left),
                ) as response:
                    kind = response.headers.get("content-type", "")
                    if response.status_code == 200 and kind.startswith("text/event-stream"):
                        self.connections += 1
                        self._failures = 0
                        opened = True
                        # The relay tells a new stream of any problem that still holds.
                        self._report(None)
                        async for state in self._read(response):
                            yield state
                        if self.ended is not None:
                            return
                        logger.info("the stream of task %s closed; resuming", self.task_id)
                    elif response.status_code == 204:
                        # The relay says we hold the ended task's last state already.
                        self.ended = str((self.state or {}).get("status", "")) or None
                        return
                    else:
                        await response.aread()
                        refusal = self._refusal(response)
                        if not retryable(response.status_code):
                            raise refusal
                        logger.info("task %s: %s; retrying", self.task_id, refusal)
                        told = retry_after(response)
                        self._report(
                            {"code": refusal.code, "message": refusal.message, "retrying": True}
                        )
            except httpx.TransportError as exc:
                why = str(exc) or type(exc).__name__
                logger.info("task %s: %s; reconnecting", self.task_id, why)
                message = f"cannot reach the relay at {client.base_url}: {why}"
                self._report({"code": "relay_unavailable", "message": message, "retrying": True})
            if opened:
                last_open = loop.time()
            left = self._time_left(last_open, loop.time())
            if left is not None and left <= 0:
                raise RelayUnavailable(
                    "relay_unavailable",
                    f"could not open a stream from {client.base_url} for"
                    f" {client.give_up_after:g} s",
                    task_id=self.task_id,
                    retrying=True,
                )
            # The stream's `retry:` hint counts from now on, as EventSource takes it.
            waits = [w for w in (told, self._retry) if w is not None]
            delay = self._delay(max(waits, default=None))
            # The last attempt is made when give_up_after runs out, not a backoff later.
            await asyncio.sleep(delay if left is None else min(delay, left))
            self._failures += 1

    def _time_left(self, last_open: float, now: float) -> float | None:
        """Seconds before the watch gives up for want of a stream, or None: never."""
        give_up_after = self.client.give_up_after
        return None if give_up_after is None else give_up_after - (now - last_open)

    def _timeout(self, left: float | None) -> httpx.Timeout:
        """The client's timeouts, with connecting cut short by the give-up time."""
        timeout = self.client.timeout
        if left is None or timeout.connect is None or left >= timeout.connect:
            return timeout
        return httpx.Timeout(max(left, 0.1), read=timeout.read)

    def _report(self, problem: dict[str, Any] | None) -> None:
        """Take a new `problem` (None: over), and tell `on_problem` when it changed."""
        if problem == self.problem:
            return
        self.problem = problem
        if self._on_problem is not None:
            self._on_problem(self)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.seq is not None:
            headers["Last-Event-ID"] = str(self.seq)
        return headers

    def _refusal(self, response: httpx.Response) -> RelayError:
        try:
            body = response.json()
        except ValueError:
            body = None
        return error_from(body, self.task_id, response.status_code, response.reason_phrase)

    def _delay(self, server_wait: float | None) -> float:
        """Seconds before the next attempt: jittered backoff, and at least the server's wait."""
        client = self.client
        delay = backoff(self._failures + 1, client.backoff_initial, client.backoff_max)
        if server_wait is not None:
            delay = max(delay, min(server_wait, LONGEST_SERVER_WAIT) * random.uniform(1.0, 1.2))
        return delay

    async def _read(self, response: httpx.Response) -> AsyncGenerator[State, None]:
        decoder = EventStreamDecoder()
        async for chunk in response.aiter_bytes():
            events = decoder.feed(chunk)
            if decoder.retry is not None:
                self._retry = decoder.retry / 1000
            for event in events:
                state = self._apply(event)
                if state is not None:
                    yield state
                if self.ended is not None:
                    return

    def _apply(self, event: ServerEvent) -> State | None:
        """Take in one event; the new state to hand over, if it changed."""
        if event.event not in ("snapshot", "patch", "end", "error"):
            return None
        try:
            data = json.loads(event.data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            message = f"the relay sent {event.event} data that is not a JSON object"
            raise RelayError("bad_response", message, task_id=self.task_id)
        if event.event == "error":
            if data.get("retrying") is True:
                logger.info("task %s: %s", self.task_id, data.get("message"))
                self._report(data)
                return None
            raise error_from(data, self.task_id)
        if event.event == "end":
            self.ended = str(data.get("status"))
            return None
        if event.event == "snapshot":
            self.snapshots += 1
            state = data
        elif self.state is None:
            message = "the relay sent a patch before any state"
            raise RelayError("bad_response", message, task_id=self.task_id)
        else:
            state = apply_patch(self.state, data)
        if event.id is not None and event.id.isdigit():
            self.seq = int(event.id)
        changed = self.state is None or not same_json(self.state, state)
        self.state = state
        self._report(None)
        return copy.deepcopy(state) if changed else None
