"""Which node of a cluster should poll a task: rendezvous hashing over the nodes watching it.

The lease (`backend.py`, `RedisBackend`) still decides who polls; this decides who asks for it.
Each task has a preferred node, the one with the highest `weight(node, task)` among
the live nodes that watch the task (have subscribers to it). With every node watching
every task, each node is preferred for about 1/N of them, and a node that joins or
leaves changes the preference of its own share only: the others' weights do not move.

The rules, applied by each node to what it read from Redis:

- A free lease: the preferred node takes it at once. So does a node that no live node
  watching the task would be preferred over (a task watched on one node starts as
  soon as it did before). Another node leaves it to the preferred one, and takes it
  itself only if it stays free for `grace` (two lease checks) after all.
- A held lease is never taken: it changes hands only when its holder gives it up, dies,
  or loses it (the takeover rules are the lease's, unchanged).
- The holder hands a lease over to the preferred node, between two polls, once it has
  held it for `settle` (ten lease periods): a task whose first subscriber reached
  another node moves at most once, and a task shorter than that never moves at all.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping

SETTLE_LEASE_PERIODS = 10


def weight(node_id: str, task_id: str) -> int:
    """The node's rendezvous weight for the task: the same on every node."""
    digest = hashlib.blake2b(f"{node_id}\x00{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preferred(task_id: str, nodes: Iterable[str]) -> str | None:
    """The node with the highest weight for the task; None when there is none."""
    return max(nodes, key=lambda node: weight(node, task_id), default=None)


class Placement:
    """One node's view of who should poll what, and the timers of its two rules.

    `clock` is the clock of the expiry times given (Redis scores: wall-clock seconds);
    the timers run on `time.monotonic`.
    """

    def __init__(
        self, node_id: str, lease_ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.live: dict[str, float] = {}  # node -> expiry of its last heartbeat
        # task -> (when read, {node watching it -> expiry of its interest})
        self.watchers: dict[str, tuple[float, dict[str, float]]] = {}
        self.held_since: dict[str, float] = {}
        self.waiting: dict[str, tuple[str, float]] = {}  # task -> (node waited for, since)

    @property
    def settle(self) -> float:
        """Seconds a lease is held before it may be handed to the preferred node."""
        return SETTLE_LEASE_PERIODS * self.lease_ttl

    @property
    def grace(self) -> float:
        """Seconds a free lease is left to its preferred node before another takes it."""
        return 2 * self.lease_ttl / 3

    # -- what was read ------------------------------------------------------------------

    def saw_nodes(self, nodes: Mapping[str, float]) -> None:
        """The node registry: every node's heartbeat expiry."""
        self.live = dict(nodes)

    def saw_watchers(self, task_id: str, nodes: Mapping[str, float]) -> None:
        """The task's interest entries (this node's among them while it wants the task)."""
        self.watchers[task_id] = (time.monotonic(), dict(nodes))

    def forget_stale(self, older_than: float) -> None:
        """Drop what was read of tasks no loop of this node has asked about lately."""
        limit = time.monotonic() - older_than
        for task_id in [t for t, (seen, _) in self.watchers.items() if seen < limit]:
            del self.watchers[task_id]
            self.waiting.pop(task_id, None)

    # -- the rules ------------------------------------------------------------------------

    def choice(self, task_id: str) -> str | None:
        """The preferred node among the live nodes watching the task, this one included."""
        now = self.clock()
        _, nodes = self.watchers.get(task_id, (0.0, {}))
        candidates = [
            node
            for node, expiry in nodes.items()
            if expiry > now and (node == self.node_id or self.live.get(node, 0.0) > now)
        ]
        return preferred(task_id, candidates)

    def should_take(self, task_id: str) -> bool:
        """Whether to take the task's lease if it is free."""
        choice = self.choice(task_id)
        if choice is None or choice == self.node_id:
            self.waiting.pop(task_id, None)
            return True
        now = time.monotonic()
        waited = self.waiting.get(task_id)
        if waited is None or waited[0] != choice:
            self.waiting[task_id] = (choice, now)
            return False
        return now - waited[1] >= self.grace

    def hand_over_to(self, task_id: str) -> str | None:
        """The node to hand a held lease to now, or None to keep it."""
        since = self.held_since.get(task_id)
        if since is None or time.monotonic() - since < self.settle:
            return None
        choice = self.choice(task_id)
        return None if choice == self.node_id else choice

    # -- what happened to the lease ---------------------------------------------------------

    def took(self, task_id: str) -> None:
        self.held_since.setdefault(task_id, time.monotonic())
        self.waiting.pop(task_id, None)

    def held_elsewhere(self, task_id: str) -> None:
        self.waiting.pop(task_id, None)

    def gave_up(self, task_id: str) -> None:
        """Released, lost, or handed over."""
        self.held_since.pop(task_id, None)
