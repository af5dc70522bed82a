"""The upstream client: one signed call to the progress API, read into a task state or a fault."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

import httpx

from .. import __version__
from ..patch import drop_nulls
from ..protocol import unknown_task_message
from ..retry import parse_retry_after
from .budget import RateBudget
from .signing import ERR_INVALID_TIMESTAMP, ERR_TIMESTAMP_EXPIRED, Signer
from .transport import UpstreamTransport

logger = logging.getLogger("relay.upstream")

PROGRESS_PATH = "/scc/comfy_get_progress"
RESULT_PATH = "/scc/comfy_get_result"
NOT_FOUND_CODE = "B_COMPUTING_CanNotFindTask"
STATUSES = frozenset({"waiting", "running", "succeeded", "failed"})
MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32
# An upstream's Retry-After is honoured up to an hour: a larger one is taken for an hour.
MAX_RETRY_AFTER = 3600.0
USER_AGENT = f"comfy-relay/{__version__}".encode()


class UpstreamError(Exception):
    """The upstream did not give a usable answer."""


class TaskNotFound(UpstreamError):
    """The upstream does not know the task ID (`B_COMPUTING_CanNotFindTask`): final."""


class Unauthorized(UpstreamError):
    """The upstream refused our credentials or signature: final, an operator must act."""

    def __init__(self, reason: str, gateway_error: str | None = None):
        super().__init__(reason)
        self.gateway_error = gateway_error or ""

    @property
    def clock_skew(self) -> bool:
        """True when the gateway refused our timestamp, not the signature itself."""
        return self.gateway_error.startswith((ERR_TIMESTAMP_EXPIRED, ERR_INVALID_TIMESTAMP))


class UpstreamUnavailable(UpstreamError):
    """A fault worth retrying: a timeout, connection error, 5xx, 429 or malformed body."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class UpstreamHTTP(httpx.AsyncClient):
    """httpx's client for the upstream, with its transport at hand.

    `UpstreamClient` hands its requests straight to `transport`: the client's own `send`
    (cookie jar, auth flow, redirects, event hooks, none of which the relay uses) cost more
    CPU per call than the HTTP exchange itself (bench/README.md). Everything else, closing
    included, is httpx's client as usual.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: float) -> None:
        super().__init__(transport=transport, timeout=httpx.Timeout(timeout))
        self.transport = transport


def make_http_client(
    timeout: float, max_connections: int, transport: httpx.AsyncBaseTransport | None = None
) -> UpstreamHTTP:
    """The one HTTP client the relay uses upstream; the only place that names httpx's client.

    Its transport is `UpstreamTransport` (relay/upstream/transport.py), holding at most
    `max_connections` connections, unless one is given (the embedded simulator's
    `httpx.ASGITransport`, a test's). A client given `transport=` ignores its own `limits=`,
    so the limits live on the transport.
    """
    if transport is None:
        transport = UpstreamTransport(max_connections=max_connections, retries=1)
    return UpstreamHTTP(transport, timeout)


class UpstreamClient:
    """Calls the progress API with the server-side key pair, at most `concurrency` calls at once."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        signer: Signer,
        concurrency: int,
        on_call: Callable[[str, float], None] | None = None,
        budget: RateBudget | None = None,
        *,
        links_relative_to_relay: bool = False,
    ) -> None:
        """`links_relative_to_relay`: leave a result's relative image URLs as they are, for
        the embedded simulator, whose images the relay serves itself."""
        self._http = http
        # With a trailing slash, so that `images/a.png` resolves below the base path.
        self._links_base = None if links_relative_to_relay else base_url.rstrip("/") + "/"
        self._base_url = base_url.rstrip("/")
        self._base_path = urlsplit(self._base_url).path
        self._signer = signer
        self._slots = asyncio.Semaphore(concurrency)
        self._on_call = on_call
        self.budget = budget or RateBudget(None)
        # Parsed once: httpx parses a URL given as text on every request.
        self._urls = {p: httpx.URL(self._base_url + p) for p in (PROGRESS_PATH, RESULT_PATH)}
        self._host = self._urls[PROGRESS_PATH].netloc
        self._timeouts = http.timeout.as_dict()
        # --request-timeout holds for the whole call, not only for each wait within it
        # (httpx's timeouts are per phase, and a read's restarts with every byte).
        self.call_timeout: float | None = max(
            (t for t in self._timeouts.values() if t is not None), default=None
        )
        transport = http.transport if isinstance(http, UpstreamHTTP) else None
        self._send: Callable[[httpx.Request], Awaitable[httpx.Response]] = (
            transport.handle_async_request if transport is not None else self._send_by_client
        )

    async def progress(self, task_id: str) -> dict[str, Any]:
        """The task's state: the envelope's `data` without nulls, with a known `status`."""
        data = await self._call(PROGRESS_PATH, task_id)
        if data.get("status") not in STATUSES:
            raise UpstreamUnavailable(f"unexpected task status {data.get('status')!r}")
        return data

    async def result(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """The finished task's result (`images`, `result`), by `deadline` (`time.monotonic()`).

        Relative image URLs are made absolute against the upstream: a browser, or `relay
        watch`, would otherwise resolve them against the relay, which does not serve them.
        """
        data = await self._call(RESULT_PATH, task_id, deadline)
        images = data.get("images")
        if self._links_base is None or not isinstance(images, list):
            return data
        base = self._links_base
        return {**data, "images": [urljoin(base, i) if isinstance(i, str) else i for i in images]}

    async def _call(self, path: str, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        # dumps({"taskId": task_id}), byte for byte, without building a dict and an encoder.
        body = ('{"taskId":' + json.dumps(task_id, ensure_ascii=False) + "}").encode()
        timeouts = self._timeouts
        if deadline is None:
            await self.budget.acquire()
        else:
            # Waiting for the budget (a 429 pause) may be cut short; a request in flight may
            # not (a transport may lose its connection slot), so it gets the time left.
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.budget.acquire()
            except TimeoutError:
                raise UpstreamUnavailable("no upstream budget left before the deadline") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise UpstreamUnavailable("no time left before the deadline")
            timeouts = {"connect": left, "read": left, "write": left, "pool": left}
        started = time.perf_counter()
        outcome = "error"
        try:
            async with self._slots:
                # Signed inside the slot, so the timestamp is fresh when the call goes out.
                headers = self._signer.sign("POST", self._base_path + path, body)
                if self.call_timeout is not None:
                    own = time.monotonic() + self.call_timeout
                    deadline = own if deadline is None else min(deadline, own)
                raw = await self._post(self._urls[path], body, headers, timeouts, deadline)
            data = read_envelope(parse_json(raw), task_id, parsed_from=raw)
            outcome = "ok"
            return data
        except TaskNotFound:
            outcome = "not_found"
            raise
        except Unauthorized:
            outcome = "unauthorized"
            raise
        finally:
            if self._on_call is not None:
                self._on_call(outcome, time.perf_counter() - started)

    async def _send_by_client(self, request: httpx.Request) -> httpx.Response:
        """For an httpx client made elsewhere: its own `send`."""
        return await self._http.send(request, stream=True)

    async def _post(
        self,
        url: httpx.URL,
        body: bytes,
        headers: dict[str, str],
        timeouts: dict[str, Any],
        deadline: float | None,
    ) -> bytes:
        """The body of a 2xx answer; any other answer or fault raised as an UpstreamError.

        `deadline` (`time.monotonic()`) goes to the transport as the request's `"deadline"`
        extension: `UpstreamTransport` ends the call by then, without cancelling anything.
        Another transport (the embedded simulator's, a test's) keeps only its own timeouts.
        """
        # Host and Content-Length given, and the body as a stream: httpx.Request then has
        # nothing to add, and costs a third of what it costs to work them out.
        raw_headers = [
            (b"Host", self._host),
            (b"Content-Length", b"%d" % len(body)),
            (b"User-Agent", USER_AGENT),
        ]
        raw_headers += [(name.encode(), value.encode()) for name, value in headers.items()]
        request = httpx.Request(
            "POST",
            url,
            headers=raw_headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": timeouts, "deadline": deadline},
        )
        try:
            response = await self._send(request)
            try:
                raw = await read_limited(response)
            finally:
                await response.aclose()
        except UpstreamUnavailable:
            raise
        except httpx.TimeoutException:
            raise UpstreamUnavailable("upstream timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream connection failed: {describe(exc)}") from None
        except Exception as exc:
            # A transport that lets its own errors out (httpx-aiohttp's lets aiohttp's out):
            # still an upstream fault, retried like any other, never a relay error.
            raise UpstreamUnavailable(f"upstream call failed: {describe(exc)}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None:
                retry_after = min(retry_after, MAX_RETRY_AFTER)
            if status == 429:
                self.budget.pause(retry_after if retry_after is not None else 1.0)
            raise UpstreamUnavailable(f"upstream answered HTTP {status}", retry_after)
        if status >= 400:
            gateway_error = response.headers.get("x-ca-error-message")
            if status in (401, 403) or gateway_error:
                raise Unauthorized(
                    f"upstream refused the call: HTTP {status} {gateway_error or ''}",
                    gateway_error,
                )
            raise UpstreamUnavailable(f"upstream answered HTTP {status}")
        return raw


def describe(exc: BaseException) -> str:
    """An exception's type and message, short enough for a log line and an error event."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


async def read_limited(response: httpx.Response) -> bytes:
    """The body, refused past MAX_BODY_BYTES (counted decoded, when it comes compressed)."""
    encoding = response.headers.get("content-encoding")
    chunks: AsyncIterable[bytes]
    if encoding is None or encoding.strip().lower() == "identity":
        # As it came: the relay asks for no compression, and httpx's decoding layers
        # (decoder, chunker, byte counts) cost more than reading the few bytes of an answer.
        chunks = cast(httpx.AsyncByteStream, response.stream)
    else:
        chunks = response.aiter_bytes()
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamUnavailable(f"upstream body larger than {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON a browser can read")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)


def parse_json(raw: bytes) -> Any:
    """Strict JSON, as browsers read it: no NaN or Infinity, nothing nested past MAX_DEPTH."""
    try:
        # What json.loads does with bytes, with one decoder made once rather than per call.
        value = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, RecursionError):
        raise UpstreamUnavailable("upstream body is not JSON") from None
    # Each level of nesting opens a container, and each container is a byte `{` or `[`
    # (strings may hold more, never fewer): an answer with few of them needs no walk.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and nesting_depth(value) > MAX_DEPTH:
        raise UpstreamUnavailable(f"upstream body is nested deeper than {MAX_DEPTH} levels")
    return value


def plain_unicode(raw: bytes) -> bool:
    """True when JSON read from `raw` cannot hold a lone surrogate: UTF-8 without an escape
    sequence or a byte that starts an encoded surrogate (json.loads lets both through)."""
    return (
        b"\\u" not in raw and b"\xed" not in raw and json.detect_encoding(raw).startswith("utf-8")
    )


def nesting_depth(value: Any) -> int:
    """How deep objects and arrays nest in a JSON value (iteratively: no recursion limit)."""
    if not isinstance(value, dict | list):
        return 0
    deepest, stack = 1, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                return deepest
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):  # only containers go on the stack
                stack.append((child, depth + 1))
    return deepest


def read_envelope(envelope: Any, task_id: str, parsed_from: bytes | None = None) -> dict[str, Any]:
    """The `data` of an API envelope, or the error it stands for.

    `parsed_from`: the body the envelope is `parse_json` of, which has bounded its nesting
    already, and whose bytes can tell that its strings need no Unicode check.
    """
    if not isinstance(envelope, dict):
        raise UpstreamUnavailable("upstream body is not an API envelope")
    if envelope.get("subErrCode") == NOT_FOUND_CODE:
        raise TaskNotFound(unknown_task_message(task_id))
    if envelope.get("status") != 10:
        code = envelope.get("subErrCode") or envelope.get("errCode") or envelope.get("status")
        raise UpstreamUnavailable(f"upstream reported failure {str(code)[:100]!r}")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise UpstreamUnavailable("upstream envelope has no data object")
    if parsed_from is None and nesting_depth(data) > MAX_DEPTH:
        raise UpstreamUnavailable(f"upstream data is nested deeper than {MAX_DEPTH} levels")
    if parsed_from is None or not plain_unicode(parsed_from):
        try:
            json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
        except (UnicodeEncodeError, ValueError):
            raise UpstreamUnavailable("upstream data is not valid Unicode JSON") from None
    cleaned: dict[str, Any] = drop_nulls(data)
    return cleaned
