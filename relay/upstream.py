"""The upstream client: one signed call to the progress API, read into a task state or a fault."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from .budget import RateBudget
from .patch import drop_nulls
from .protocol import dumps
from .signing import ERR_INVALID_TIMESTAMP, ERR_TIMESTAMP_EXPIRED, Signer

logger = logging.getLogger("relay.upstream")

PROGRESS_PATH = "/scc/comfy_get_progress"
RESULT_PATH = "/scc/comfy_get_result"
NOT_FOUND_CODE = "B_COMPUTING_CanNotFindTask"
STATUSES = frozenset({"waiting", "running", "succeeded", "failed"})
MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32


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


def make_http_client(
    timeout: float, max_connections: int, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one HTTP client the relay uses upstream; the only place that names httpx's client.

    Limits go on the transport: a client given `transport=` ignores its own `limits=`.
    """
    if transport is None:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=1)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout))


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(max(seconds, 0.0), 3600.0)


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
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._base_path = urlsplit(self._base_url).path
        self._signer = signer
        self._slots = asyncio.Semaphore(concurrency)
        self._on_call = on_call
        self.budget = budget or RateBudget(None)

    async def progress(self, task_id: str) -> dict[str, Any]:
        """The task's state: the envelope's `data` without nulls, with a known `status`."""
        data = await self._call(PROGRESS_PATH, task_id)
        if data.get("status") not in STATUSES:
            raise UpstreamUnavailable(f"unexpected task status {data.get('status')!r}")
        return data

    async def result(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """The finished task's result (`images`, `result`), by `deadline` (`time.monotonic()`)."""
        return await self._call(RESULT_PATH, task_id, deadline)

    async def _call(self, path: str, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        body = dumps({"taskId": task_id}).encode()
        request_timeout = None
        if deadline is None:
            await self.budget.acquire()
        else:
            # Waiting for the budget (a 429 pause) may be cut short; a request in flight may
            # not (httpx can leak a pool slot), so it gets only the time that is left.
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.budget.acquire()
            except TimeoutError:
                raise UpstreamUnavailable("no upstream budget left before the deadline") from None
            request_timeout = deadline - time.monotonic()
            if request_timeout <= 0:
                raise UpstreamUnavailable("no time left before the deadline")
        started = time.perf_counter()
        outcome = "error"
        try:
            async with self._slots:
                # Signed inside the slot, so the timestamp is fresh when the call goes out.
                headers = self._signer.sign("POST", self._base_path + path, body)
                envelope = await self._post(self._base_url + path, body, headers, request_timeout)
            data = read_envelope(envelope, task_id)
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

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], request_timeout: float | None
    ) -> Any:
        request = self._http.build_request(
            "POST",
            url,
            content=body,
            headers=headers,
            timeout=httpx.USE_CLIENT_DEFAULT if request_timeout is None else request_timeout,
        )
        try:
            async with await_response(self._http, request) as response:
                raw = await read_limited(response)
        except httpx.TimeoutException:
            raise UpstreamUnavailable("upstream timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream connection failed: {type(exc).__name__}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429:
                self.budget.pause(retry_after if retry_after is not None else 1.0)
            raise UpstreamUnavailable(f"upstream answered HTTP {status}", retry_after)
        gateway_error = response.headers.get("x-ca-error-message")
        if status in (401, 403) or (400 <= status < 500 and gateway_error):
            raise Unauthorized(
                f"upstream refused the call: HTTP {status} {gateway_error or ''}", gateway_error
            )
        if status >= 400:
            raise UpstreamUnavailable(f"upstream answered HTTP {status}")
        return parse_json(raw)


@asynccontextmanager
async def await_response(
    http: httpx.AsyncClient, request: httpx.Request
) -> AsyncIterator[httpx.Response]:
    response = await http.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()


async def read_limited(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamUnavailable(f"upstream body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON a browser can read")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """Strict JSON, as browsers read it: no NaN or Infinity, nothing nested past MAX_DEPTH."""
    try:
        value = json.loads(raw, parse_constant=reject_constant, parse_float=finite_float)
    except (ValueError, RecursionError):
        raise UpstreamUnavailable("upstream body is not JSON") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise UpstreamUnavailable(f"upstream body is nested deeper than {MAX_DEPTH} levels")
    return value


def nesting_depth(value: Any) -> int:
    """How deep objects and arrays nest in a JSON value (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def read_envelope(envelope: Any, task_id: str) -> dict[str, Any]:
    """The `data` of an API envelope, or the error it stands for."""
    if not isinstance(envelope, dict):
        raise UpstreamUnavailable("upstream body is not an API envelope")
    if envelope.get("subErrCode") == NOT_FOUND_CODE:
        raise TaskNotFound(f"upstream does not know task {task_id}")
    if envelope.get("status") != 10:
        code = envelope.get("subErrCode") or envelope.get("errCode") or envelope.get("status")
        raise UpstreamUnavailable(f"upstream reported failure {str(code)[:100]!r}")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise UpstreamUnavailable("upstream envelope has no data object")
    if nesting_depth(data) > MAX_DEPTH:
        raise UpstreamUnavailable(f"upstream data is nested deeper than {MAX_DEPTH} levels")
    try:
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeEncodeError, ValueError):
        raise UpstreamUnavailable("upstream data is not valid Unicode JSON") from None
    cleaned: dict[str, Any] = drop_nulls(data)
    return cleaned
