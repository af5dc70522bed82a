"""Webhooks: the events of watched tasks, POSTed to the backend, signed, retried until delivered.

An event is made once (by `service.py`) and stored before anything is sent: its
`webhook-id` and its body never change, so every retry carries the same ones and a
receiver can drop duplicates. Delivery is at least once:

- `Webhooks` runs a dispatcher and at most `WORKERS` deliveries at a time, on an httpx
  client of its own, so that a slow or dead endpoint never holds up a poll loop or a
  browser. The dispatcher claims due events from the `Outbox` (SQLite, or Redis in a
  cluster, where a claim hides the event from every other node for `CLAIM_SECONDS`).
- Each attempt is signed as the Standard Webhooks specification says: `webhook-id`,
  `webhook-timestamp` (the attempt's time) and `webhook-signature`, `v1,` then the base64
  HMAC-SHA256 of `id.timestamp.body` under the base64-decoded `whsec_` secret.
- A 2xx is delivered. Timeouts, connection errors, 408, 429 and 5xx are retried with
  capped exponential backoff and jitter (`RetryPolicy`), never sooner than a
  `Retry-After` asks; any other answer is final. An event is dropped after
  `RetryPolicy.max_attempts` attempts or `RetryPolicy.max_age` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from .. import __version__
from ..protocol import dumps
from ..retry import backoff, parse_retry_after

logger = logging.getLogger("relay.webhooks")

WORKERS = 8
"""Deliveries in flight at once, per process."""
ATTEMPT_TIMEOUT = 10.0
"""Seconds one attempt may take, connection included."""
CLAIM_SECONDS = 30.0
"""How long a claimed event stays hidden from other workers and nodes: a node that dies
mid-delivery leaves it due again after this."""
POLL_SECONDS = 1.0
"""How often the dispatcher looks for due events when nothing wakes it (retries, other nodes)."""
BACKLOG_LIMIT = 100_000
"""Undelivered events past which `task.changed` events are no longer stored (ends always are):
a receiver down for long must not fill the disk or Redis."""
SECRET_PREFIX = "whsec_"
SECRET_FORM = "whsec_ followed by the base64 of 24 to 64 random bytes"
MAKE_SECRET = (
    "python3 -c 'import base64,os; print(\"whsec_\"+base64.b64encode(os.urandom(32)).decode())'"
)

Outcome = Literal["delivered", "retrying", "rejected", "abandoned"]
OUTCOMES: tuple[Outcome, ...] = ("delivered", "retrying", "rejected", "abandoned")


@dataclass(frozen=True)
class Outgoing:
    """One webhook event as stored: its `webhook-id`, its task, its body, made once."""

    id: str
    task_id: str
    body: str
    created_at: float
    attempts: int = 0


class Outbox(Protocol):
    """Where events wait until delivered: a `WatchStore` (SQLite, or Redis in a cluster)."""

    async def claim_events(self, limit: int, hold: float) -> list[Outgoing]:
        """Up to `limit` due events, hidden from every other claim for `hold` seconds (a relay
        alone hides them until they are finished, retried or released)."""

    async def retry_event(self, event_id: str, attempts: int, delay: float) -> None:
        """Count a failed attempt; the event is due again in `delay` seconds."""

    async def finish_event(self, event_id: str) -> None:
        """Forget an event: delivered, refused for good, or given up on."""

    async def release_events(self, event_ids: list[str]) -> None:
        """Make claimed events due again at once (this process is stopping)."""

    async def pending_events(self) -> tuple[int, float]:
        """How many events wait, and the age in seconds of the oldest (0 when none)."""


def event_body(kind: str, data: dict[str, Any], at: float) -> str:
    """The JSON an event carries, in the Standard Webhooks payload shape: type, timestamp, data."""
    timestamp = (
        datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return dumps({"type": kind, "timestamp": timestamp, "data": data})


def decode_secret(secret: str) -> bytes:
    """The key a `whsec_` secret stands for (the prefix is optional); ValueError if malformed."""
    raw = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = None
    if key is None or not 24 <= len(key) <= 64:
        got = "text that is not base64" if key is None else f"{len(key)} bytes"
        raise ValueError(f"must be {SECRET_FORM}, got {got} (make one: {MAKE_SECRET})")
    return key


def signature(key: bytes, event_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{event_id}.{timestamp}.{body}".encode()
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, event_id: str, timestamp: int, body: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": f"comfy-relay/{__version__}",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, event_id, timestamp, body),
    }


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed event again, and when to give up on it.

    The n-th retry waits a random time between half and all of `base * 2**(n-1)`,
    at most `cap`, and never less than the receiver's `Retry-After`. With the defaults
    20 attempts span about four hours; an event older than `max_age` is dropped at its
    next failure.
    """

    base: float = 1.0
    cap: float = 1800.0
    max_attempts: int = 20
    max_age: float = 86_400.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        delay = backoff(attempts, self.base, self.cap, self.rng)
        return max(delay, retry_after) if retry_after is not None else delay

    def gives_up(self, attempts: int, age: float) -> bool:
        return attempts >= self.max_attempts or age >= self.max_age


@dataclass(frozen=True)
class Answer:
    """What one attempt came to: delivered, retry (after `retry_after` if the receiver said), or
    rejected for good; `reason` for the logs."""

    outcome: Literal["delivered", "retry", "rejected"]
    reason: str
    retry_after: float | None = None


class Webhooks:
    """Delivers what the outbox holds to one URL, at most `workers` events at a time."""

    def __init__(
        self,
        outbox: Outbox,
        url: str,
        secret: str,
        *,
        policy: RetryPolicy | None = None,
        workers: int = WORKERS,
        timeout: float = ATTEMPT_TIMEOUT,
        hold: float = CLAIM_SECONDS,
        on_attempt: Callable[[Outcome], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._outbox = outbox
        self._url = url
        self._key = decode_secret(secret)
        self._policy = policy or RetryPolicy()
        self._workers = workers
        self._timeout = timeout
        self._hold = max(hold, timeout * 2)
        self._on_attempt = on_attempt
        # Its own client, on httpx's standard transport (proxies from the environment, TLS
        # verification), apart from the upstream's: a slow receiver never takes an upstream slot.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
            transport=transport,
        )
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._failing = False
        self._stats_at = 0.0
        self.pending = 0
        self.oldest_age = 0.0

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="webhook dispatcher")

    def backlogged(self) -> bool:
        """True when more than `BACKLOG_LIMIT` events wait (as of the last look)."""
        return self.pending > BACKLOG_LIMIT

    def wake(self) -> None:
        """An event was stored: look for due events now rather than at the next poll."""
        self._wake.set()

    async def close(self, grace: float = 2.0) -> None:
        """Stop: deliveries in flight get `grace` seconds, the rest are due again at once."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        unfinished: list[str] = []
        if self._inflight:
            _, late = await asyncio.wait(self._inflight.values(), timeout=grace)
            unfinished = [event_id for event_id, task in self._inflight.items() if task in late]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if unfinished:
            try:
                await self._outbox.release_events(unfinished)
            except Exception as exc:
                logger.warning("could not release %d webhook events: %s", len(unfinished), exc)
        await self._http.aclose()

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            free = self._workers - len(self._inflight)
            try:
                claimed = await self._outbox.claim_events(free, self._hold) if free > 0 else []
                await self._refresh_stats()
            except Exception as exc:
                if not self._failing:
                    logger.warning("cannot read the webhook outbox: %s", exc)
                self._failing = True
                await asyncio.sleep(POLL_SECONDS)
                continue
            self._failing = False
            for event in claimed:
                if event.id in self._inflight:
                    continue  # claimed again after its hold ran out, still being sent here
                task = asyncio.create_task(self._deliver(event), name=f"webhook {event.id}")
                self._inflight[event.id] = task
            if free > 0 and len(claimed) == free:
                continue  # there may be more due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= POLL_SECONDS:
            self._stats_at = now
            self.pending, self.oldest_age = await self._outbox.pending_events()

    async def _deliver(self, event: Outgoing) -> None:
        try:
            answer = await self.attempt(event)
            attempts = event.attempts + 1
            outcome: Outcome
            if answer.outcome == "delivered":
                outcome = "delivered"
                await self._outbox.finish_event(event.id)
            elif answer.outcome == "rejected":
                outcome = "rejected"
                logger.warning(
                    "webhook %s for task %s refused: %s; not retried",
                    event.id,
                    event.task_id,
                    answer.reason,
                    extra={"task_id": event.task_id},
                )
                await self._outbox.finish_event(event.id)
            elif self._policy.gives_up(attempts, time.time() - event.created_at):
                outcome = "abandoned"
                logger.error(
                    "webhook %s for task %s dropped after %d attempts: %s",
                    event.id,
                    event.task_id,
                    attempts,
                    answer.reason,
                    extra={"task_id": event.task_id},
                )
                await self._outbox.finish_event(event.id)
            else:
                outcome = "retrying"
                delay = self._policy.delay(attempts, answer.retry_after)
                logger.warning(
                    "webhook %s for task %s: %s; attempt %d in %.1fs",
                    event.id,
                    event.task_id,
                    answer.reason,
                    attempts + 1,
                    delay,
                    extra={"task_id": event.task_id},
                )
                await self._outbox.retry_event(event.id, attempts, delay)
            if self._on_attempt is not None:
                self._on_attempt(outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Due again once released, or once its claim runs out: at least once, never lost.
            logger.exception("webhook %s: could not record the attempt", event.id)
            with contextlib.suppress(Exception):
                await self._outbox.release_events([event.id])
        finally:
            self._inflight.pop(event.id, None)
            self._wake.set()

    async def attempt(self, event: Outgoing) -> Answer:
        """POST the event once, signed with this attempt's timestamp."""
        headers = signed_headers(self._key, event.id, int(time.time()), event.body)
        try:
            # httpx's timeouts bound each wait, and a read's restarts with every byte: a
            # receiver trickling its answer's head would hold a delivery slot for ever.
            # Cancelled at `timeout`, httpx closes the connection. No attempt ever waits for
            # a connection (at most `workers` run, on as many), and only a request cancelled
            # while it waits can strand one in httpcore's pool (encode/httpcore#1093).
            async with asyncio.timeout(self._timeout):
                # Streamed and never read: a receiver's answer body is of no use here.
                async with self._http.stream(
                    "POST", self._url, content=event.body.encode(), headers=headers
                ) as response:
                    status = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except (httpx.TimeoutException, TimeoutError):
            return Answer("retry", "the receiver timed out")
        except httpx.HTTPError as exc:
            return Answer("retry", f"connection failed: {type(exc).__name__}")
        if 200 <= status < 300:
            return Answer("delivered", f"HTTP {status}")
        if status in (408, 429) or status >= 500:
            return Answer("retry", f"HTTP {status}", retry_after)
        return Answer("rejected", f"HTTP {status}")
