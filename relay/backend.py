"""Where changes go and who polls: the interface between a relay and the rest of its cluster.

A relay alone uses `LocalBackend`: it polls every task its subscribers watch and
tells no one else. Several relays share a `RedisBackend` (`cluster/`):
one of them holds a task's lease and polls it, stores each change and publishes it;
the others follow. The poll loop (`poll_loop.py`) is written once, against this
interface, and the data crosses it in one direction per concern:

- the loop asks for the right to poll (`acquire`, `renew`, `release`) and says
  whether this node still wants the task (`interest`);
- the loop hands each change it polled to `store` (fenced by the lease);
- changes polled by other nodes come back only through the `receive` callback
  given to `start`, and `load` reads what is stored, for resumes and late readers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from .protocol import TERMINAL


@dataclass(frozen=True)
class Change:
    """One change of a task as it crosses between nodes: a new state, or an error.

    `state` with its `seq` (and `patch` from the state before, when known), or
    `error` (`{"code", "message"}`) that is `final` or a passing outage. `history`
    holds the stored `(seq, state)` pairs up to this one (`state` last), oldest first,
    at most `HISTORY_SIZE`, when the change is read from the store, so that resumes
    from older states still get a patch.
    """

    task_id: str
    seq: int | None = None
    state: dict[str, Any] | None = None
    patch: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    final: bool = False
    history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """True when nothing will follow: a terminal state or a final error."""
        if self.error is not None:
            return self.final
        return self.state is not None and self.state.get("status") in TERMINAL


Receive = Callable[[Change], bool]
"""Deliver another node's change; False when it does not follow what this node holds
(a patch after a gap): the backend then reads the stored state instead."""

Wake = Callable[[str], None]
"""Wake a task's loop now: its lease may be free (released, or its holder died)."""


class Backend(Protocol):
    """One node's side of a cluster. tests/test_backend_contract.py holds every cluster
    backend (the tests' in-memory one, `RedisBackend`) to what these docstrings say."""

    @property
    def check_interval(self) -> float:
        """Seconds between a node's heartbeats, and between the looks of a follower whose
        lease is free but left to another node."""

    @property
    def follow_interval(self) -> float:
        """Seconds a follower may wait between its looks at the lease and the store; it is
        woken sooner (`Wake`) when the lease may be free."""

    @property
    def healthy(self) -> bool:
        """False while the node cannot reach the rest of its cluster (`/healthz`)."""

    def start(self, receive: Receive, wake: Wake | None = None) -> None:
        """Begin delivering other nodes' changes to `receive` (never this node's own), and
        waking a task's loop with `wake` when its lease may be free."""

    async def close(self) -> None:
        """Stop delivering to `receive`, and give up every lease this node holds."""

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record whether this node wants the task; return how many nodes want it.

        A node's interest lapses a few lease periods after it last said it wants the task
        (a node that died is not waited for); a count may be a lease period old."""

    async def acquire(self, task_id: str) -> bool:
        """Take the right to poll the task, or keep it if this node holds it; False while
        another live node holds it, or while a free one is left to the node that should
        poll the task (`cluster/placement.py`). A lease lives while its holder does: a
        holder that stops (dies, or cannot reach the cluster) loses it within a lease
        period and a check."""

    async def renew(self, task_id: str) -> bool:
        """Whether this node still holds the right to poll, before a poll; False when it
        was lost or handed over (stop polling at once)."""

    def keep_lease(self, task_id: str) -> AbstractAsyncContextManager[None]:
        """Whatever keeps the lease while an upstream call runs (one can outlast it)."""

    async def release(self, task_id: str) -> None:
        """Give up the right to poll, if this node holds it; another node's is left alone."""

    async def store(self, change: Change) -> bool:
        """Store a change and tell the other nodes; False, with nothing stored or told,
        when this node does not hold the task's lease. A passing error is told, not stored."""

    async def load(self, task_id: str) -> Change | None:
        """What is stored of a task: its last state with its history, and its final error;
        None if nothing. For a task this node wants, a state it has already seen (stored,
        received or loaded) may be left out."""


class LocalBackend:
    """A relay on its own: it polls every task it watches, and its hub holds all there is."""

    check_interval = float("inf")
    follow_interval = float("inf")
    healthy = True

    def start(self, receive: Receive, wake: Wake | None = None) -> None:
        pass

    async def close(self) -> None:
        pass

    async def interest(self, task_id: str, wanted: bool) -> int:
        return int(wanted)

    async def acquire(self, task_id: str) -> bool:
        return True

    async def renew(self, task_id: str) -> bool:
        return True

    def keep_lease(self, task_id: str) -> AbstractAsyncContextManager[None]:
        return nullcontext()

    async def release(self, task_id: str) -> None:
        pass

    async def store(self, change: Change) -> bool:
        return True

    async def load(self, task_id: str) -> Change | None:
        return None
