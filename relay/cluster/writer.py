"""`ChangeWriter`: the polling node's changes go to Redis together, one round trip a batch.

A loop hands its change to `write` and waits. While one batch is in flight the next
gathers, so under load a round trip carries many changes (group commit) and alone it
carries one, at once. A batch is a pipeline of one fenced `STORE` per change (each on one
task's key), then one `PUBLISH` of the changes that were stored: a change is written
once, and published small (its patch when it has one, not its state).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from ..backend import Change
from ..protocol import HISTORY_SIZE, ErrorCode, dumps
from .keys import CHANNEL, STORE, Scripts, ring_field, state_key

MAX_BATCH = 500
# How long a batch gathers before it goes: each batch is a round trip and a PUBLISH, and a
# progress bar does not tell 2 ms.
GATHER_SECONDS = 0.002


class Stored(IntEnum):
    """What `STORE` answered for a change."""

    DONE = 1
    FENCED = 0  # the lease is not this node's
    BEHIND = -1  # the stored number is not older: this node's state is behind


@dataclass(frozen=True)
class Expiry:
    """How long stored keys live after their last write, in seconds."""

    ended: int  # a task's states after its end
    unknown: int  # a final error (an ID unknown upstream): as briefly as a relay alone


def message_of(change: Change) -> dict[str, Any]:
    """What followers get of a stored change (see `parse_change`)."""
    if change.error is not None:
        return {"t": change.task_id, "e": change.error, "final": change.final}
    if change.patch is not None:
        return {"t": change.task_id, "s": change.seq, "p": change.patch}
    return {"t": change.task_id, "s": change.seq, "state": change.state}


def store_args(node_id: str, change: Change, expiry: Expiry) -> list[Any]:
    if change.error is not None:
        if not change.final:
            return [node_id, "", "error", "", 0]  # a passing outage: fenced, not stored
        return [node_id, "", "error", dumps(change.error), expiry.unknown]
    assert change.seq is not None
    entry = dumps([change.seq, change.state])
    keep = expiry.ended if change.ended else 0
    return [node_id, change.seq, ring_field(change.seq, HISTORY_SIZE), entry, keep]


class ChangeWriter:
    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        node_id: str,
        expiry: Expiry,
        failed: Callable[[str, BaseException], None],
    ) -> None:
        self._redis = client
        self._scripts = scripts
        self._node_id = node_id
        self._expiry = expiry
        self._failed = failed
        self._pending: list[tuple[Change, asyncio.Future[int]]] = []
        self._sending: list[tuple[Change, asyncio.Future[int]]] = []
        self._flushing: asyncio.Task[None] | None = None
        # Every node receives its own messages too: they start with these bytes.
        self.own_prefix = (dumps({"n": node_id})[:-1] + ",").encode()

    def write(self, change: Change) -> Awaitable[int]:
        """Store and publish a change; what `STORE` answered (`Stored`), FENCED also when
        Redis could not be reached."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((change, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush(), name="cluster writer")
        return future

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    async def _flush(self) -> None:
        try:
            # A moment for the changes of the loops woken together to join the first batch.
            await asyncio.sleep(GATHER_SECONDS)
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._sending = batch
                results = await self._send([change for change, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flushing = None
            # Cancelled (at close): what was not answered counts as not stored.
            for _, future in [*self._sending, *self._pending]:
                if not future.done():
                    future.set_result(Stored.FENCED)
            self._sending = []
            self._pending = []

    async def _send(self, changes: list[Change]) -> list[int]:
        try:
            answers = await self._store_all(changes)
            if any(isinstance(answer, NoScriptError) for answer in answers):
                self._scripts.forget()  # Redis restarted and forgot the script
                answers = await self._store_all(changes)
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            results = [int(answer) for answer in answers]
            stored = [c for c, done in zip(changes, results, strict=True) if done == Stored.DONE]
            if stored:
                await self._redis.publish(CHANNEL, batch_message(self._node_id, stored))
        except (RedisError, OSError) as exc:
            self._failed("publish", exc)
            return [Stored.FENCED] * len(changes)  # the loops stop; they retake their leases
        return results

    async def _store_all(self, changes: list[Change]) -> list[Any]:
        """One pipeline of fenced stores; each answer is 1, 0, -1 or the error it raised."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for change in changes:
                args = store_args(self._node_id, change, self._expiry)
                await self._scripts.queue(pipe, STORE, [state_key(change.task_id)], args)
            return list(await pipe.execute(raise_on_error=False))


def batch_message(node_id: str, changes: list[Change], released: Sequence[str] = ()) -> str:
    """One published message (`parse_batch` reads it): the changes a node stored, each as
    `message_of` says, and the leases it released."""
    message: dict[str, Any] = {"n": node_id, "c": [message_of(c) for c in changes]}
    if released:
        message["r"] = list(released)
    return dumps(message)


@dataclass(frozen=True)
class Batch:
    """One published message: the changes another node stored, and the leases it released."""

    changes: list[Change]
    released: list[str]


def parse_batch(raw: Any) -> Batch | None:
    """A published batch; None when it is not one. A change in it that cannot be read
    (say, an error code of a newer version) is left out: its task resyncs at the next."""
    try:
        message = json.loads(raw)
        entries = list(message["c"])
        released = [str(task_id) for task_id in message.get("r", [])]
    except (ValueError, TypeError, KeyError):
        return None
    changes = []
    for entry in entries:
        try:
            changes.append(parse_change(entry))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return Batch(changes, released)


def parse_change(entry: dict[str, Any]) -> Change:
    task_id = str(entry["t"])
    if "e" in entry:
        error = entry["e"]
        code = ErrorCode(str(error["code"]))  # ValueError for a code this version lacks
        return Change(
            task_id,
            error={"code": code.value, "message": str(error["message"])},
            final=bool(entry.get("final")),
        )
    seq = int(entry["s"])
    if "p" in entry:
        if not isinstance(entry["p"], dict):
            raise TypeError("a patch is an object")
        return Change(task_id, seq, patch=entry["p"])
    if not isinstance(entry["state"], dict):
        raise TypeError("a state is an object")
    return Change(task_id, seq, entry["state"])
