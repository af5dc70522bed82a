"""Where changes go and who polls: the interface between a relay and the rest of its cluster.

A relay alone uses `LocalBackend`: it polls every task its subscribers watch and
tells no one else. Several relays share a `RedisBackend` (`cluster/backend.py`):
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
    holds older `(seq, state)` pairs, oldest first, when the change is read from
    the store, so that resumes from them still get a patch.
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


Receive = Callable[[Change], None]


class Backend(Protocol):
    @property
    def check_interval(self) -> float:
        """Seconds between a follower's looks at the store and an owner's lease renewals."""

    @property
    def healthy(self) -> bool: ...

    def start(self, receive: Receive) -> None:
        """Begin delivering other nodes' changes to `receive`."""

    async def close(self) -> None: ...

    async def interest(self, task_id: str, wanted: bool) -> int:
        """Record whether this node wants the task; return how many nodes want it."""

    async def acquire(self, task_id: str) -> bool:
        """Take the right to poll the task; False while another node holds it."""

    async def renew(self, task_id: str) -> bool:
        """Keep the right to poll; False when it was lost (stop polling at once)."""

    def keep_lease(self, task_id: str) -> AbstractAsyncContextManager[None]:
        """Keep renewing while an upstream call runs (one can outlast the lease)."""

    async def release(self, task_id: str) -> None: ...

    async def store(self, change: Change) -> bool:
        """Store a change and tell the other nodes; False when this node lost the lease."""

    async def load(self, task_id: str) -> Change | None:
        """What is stored of a task (state with history, or final error); None if nothing."""


class LocalBackend:
    """A relay on its own: it polls every task it watches, and its hub holds all there is."""

    check_interval = float("inf")
    healthy = True

    def start(self, receive: Receive) -> None:
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
