"""The per-task hub: state, sequence numbers, recent history and subscribers of every watched task.

Subscribers hold no queue. A change marks each subscriber's cursor dirty and wakes
it; when the subscriber's sender gets to it, the cursor works out what that
subscriber still lacks: the shared, pre-encoded patch when it is one change
behind, one combined patch when it is further behind but the state it holds
is remembered, a snapshot otherwise. A slow client therefore costs one cursor,
never a backlog, and never slows the poll loop or anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from .patch import merge_patch
from .protocol import ErrorCode, Event, error_data
from .upstream import TERMINAL

logger = logging.getLogger("relay.hub")

HISTORY_SIZE = 64
NOT_FOUND_TTL = 10.0
MAX_ENDED_TASKS = 10_000


class Subscriber:
    """One connection's interest in its tasks; its sender sleeps until one has news."""

    __slots__ = ("_dirty", "_wake", "closing", "transport")

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.closing = False
        self._dirty: dict[Cursor, None] = {}
        self._wake = asyncio.Event()

    def mark(self, cursor: Cursor) -> None:
        self._dirty[cursor] = None
        self._wake.set()

    def poke(self) -> None:
        """Wake the sender for something of the connection's own (a reply to the client)."""
        self._wake.set()

    def close(self) -> None:
        """Ask the sender to finish (server shutdown, or the connection is being dropped)."""
        self.closing = True
        self._wake.set()

    async def changed(self) -> list[Cursor]:
        """Wait for news, then return the cursors that have some (empty when closing)."""
        await self._wake.wait()
        self._wake.clear()
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty


class Cursor:
    """Where one subscriber stands in one task's history."""

    __slots__ = ("done", "notice_gen", "seq", "subscriber", "task")

    def __init__(self, task: TaskHub, subscriber: Subscriber, seq: int | None) -> None:
        self.task = task
        self.subscriber = subscriber
        self.seq = seq
        self.notice_gen = 0
        self.done = False

    def pending(self) -> list[Event]:
        """The events this subscriber lacks, oldest first; advances the cursor past them."""
        return self.task.catch_up(self)


class TaskHub:
    """Everything the relay knows about one task, and the subscribers that watch it."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.state: dict[str, Any] | None = None
        self.seq = 0
        self.cursors: set[Cursor] = set()
        self.ended = False
        self.stop_requested = False
        self.shutting_down = False
        self._history: deque[tuple[int, dict[str, Any]]] = deque(maxlen=HISTORY_SIZE)
        self._last_patch: Event | None = None
        self._last_patch_from = 0
        self._snapshot: Event | None = None
        self._notice: Event | None = None
        self._notice_gen = 0
        self._final: Event | None = None
        self._wakeup = asyncio.Event()

    # -- written by the poll loop ---------------------------------------------------

    def next_seq(self) -> int:
        """The number the next change gets: one more, or the clock's for a task's first state.

        Numbering a new loop from the clock in milliseconds means a number never
        repeats for a task, even across restarts.
        """
        if self.state is None:
            return max(time.time_ns() // 1_000_000, self.seq + 1)
        return self.seq + 1

    def publish(
        self,
        state: dict[str, Any],
        seq: int | None = None,
        patch: dict[str, Any] | None = None,
    ) -> bool:
        """Record a new state; returns False when nothing changed (nothing is pushed).

        `seq` is given when the number was chosen elsewhere (a cluster's polling
        node); a state not newer than the one held is ignored. `patch`, when
        given, must lead from the state held to this one.
        """
        if self.ended:
            return False
        if seq is None:
            self._notice = None
            if self.state is not None:
                # Not `==`: Python holds 1 == True, JSON does not.
                patch = merge_patch(self.state, state)
                if not patch:
                    return False
            seq = self.next_seq()
        elif seq <= self.seq:
            return False
        self._notice = None
        if self.state is None:
            self._last_patch = None
        else:
            if patch is None or seq != self.seq + 1:
                patch = merge_patch(self.state, state)
            self._last_patch = Event("patch", self.task_id, seq, patch)
            self._last_patch_from = self.seq
        self.seq = seq
        self.state = state
        self._snapshot = None
        self._history.append((seq, state))
        if state.get("status") in TERMINAL:
            self.ended = True
            self._final = Event("end", self.task_id, seq, {"status": state["status"]})
        self._notify()
        return True

    def remember(self, history: list[tuple[int, dict[str, Any]]]) -> None:
        """Add older states (oldest first) so that resumes from them get a patch."""
        known = {seq for seq, _ in self._history}
        older = [(seq, state) for seq, state in history if seq < self.seq and seq not in known]
        merged = sorted([*older, *self._history], key=lambda entry: entry[0])
        self._history = deque(merged[-HISTORY_SIZE:], maxlen=HISTORY_SIZE)

    def report_unavailable(self, message: str) -> None:
        """Tell subscribers the upstream is failing and the loop is retrying (once per outage)."""
        if self._notice is not None or self.ended:
            return
        data = error_data(ErrorCode.UPSTREAM_UNAVAILABLE, message, retrying=True)
        self._notice = Event("error", self.task_id, None, data)
        self._notice_gen += 1
        self._notify()

    def fail(self, code: ErrorCode, message: str) -> None:
        """End the task with a final error (unknown task, refused credentials)."""
        if self.ended:
            return
        self.ended = True
        self._notice = None
        self._final = Event("error", self.task_id, None, error_data(code, message))
        self._notify()

    # -- read by subscribers ----------------------------------------------------------

    @property
    def unavailable(self) -> bool:
        """True while the loop is backing off from a failing upstream."""
        return self._notice is not None

    @property
    def final_seq(self) -> int | None:
        """The sequence number of an ended task's last state (None if running or stateless)."""
        return self.seq if self.ended and self.state is not None else None

    @property
    def final_error(self) -> dict[str, Any] | None:
        """The final error's data when the task ended in one (unknown task, refused credentials)."""
        final = self._final
        return final.data if final is not None and final.kind == "error" else None

    def delivered_all(self, seq: int | None) -> bool:
        """True when a client holding state `seq` has everything this ended task will send."""
        final = self.final_seq
        return final is not None and seq is not None and seq >= final

    def snapshot(self) -> Event:
        assert self.state is not None
        if self._snapshot is None or self._snapshot.seq != self.seq:
            self._snapshot = Event("snapshot", self.task_id, self.seq, self.state)
        return self._snapshot

    def catch_up(self, cursor: Cursor) -> list[Event]:
        events: list[Event] = []
        if cursor.done:
            return events
        if self.state is not None and cursor.seq != self.seq:
            events.append(self._state_since(cursor.seq))
            cursor.seq = self.seq
        if self._notice is not None and cursor.notice_gen != self._notice_gen:
            events.append(self._notice)
            cursor.notice_gen = self._notice_gen
        if self._final is not None:
            events.append(self._final)
            cursor.done = True
        return events

    def _state_since(self, seq: int | None) -> Event:
        if seq is not None and self._last_patch is not None and seq == self._last_patch_from:
            return self._last_patch
        if seq is not None and seq < self.seq:
            for old_seq, old_state in self._history:
                if old_seq == seq:
                    assert self.state is not None
                    return Event(
                        "patch", self.task_id, self.seq, merge_patch(old_state, self.state)
                    )
        return self.snapshot()

    def _notify(self) -> None:
        for cursor in self.cursors:
            cursor.subscriber.mark(cursor)

    # -- the loop's pacing ----------------------------------------------------------

    def request_stop(self) -> None:
        self.stop_requested = True
        self._wakeup.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep between polls; returns early when the loop is asked to stop."""
        if self.stop_requested:
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._wakeup.clear()


PollLoop = Callable[[TaskHub], Coroutine[Any, Any, None]]


class Hub:
    """All watched tasks of this process: starts one poll loop per task and ends it in time."""

    def __init__(
        self,
        poll: PollLoop,
        *,
        linger: float,
        ended_ttl: float,
        on_loops: Callable[[int], None] | None = None,
        on_subscribers: Callable[[str, int], None] | None = None,
    ) -> None:
        self._poll = poll
        self._linger = linger
        self._ended_ttl = ended_ttl
        self._on_loops = on_loops
        self._on_subscribers = on_subscribers
        self.pushed_counts: dict[str, int] = {}
        self.tasks: dict[str, TaskHub] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ended: dict[str, None] = {}
        self._closing = False

    def pushed(self, transport: str, count: int) -> None:
        """Count messages sent to subscribers (read by the metrics when scraped)."""
        self.pushed_counts[transport] = self.pushed_counts.get(transport, 0) + count

    @property
    def loop_count(self) -> int:
        return len(self._loops)

    @property
    def backing_off(self) -> int:
        return sum(1 for task in self.tasks.values() if task.unavailable)

    @property
    def subscriber_count(self) -> int:
        return sum(len(task.cursors) for task in self.tasks.values())

    def get(self, task_id: str) -> TaskHub | None:
        return self.tasks.get(task_id)

    def subscribe(self, task_id: str, subscriber: Subscriber, seq: int | None = None) -> Cursor:
        """Add a subscriber to a task, starting its poll loop if it has none.

        The cursor is marked dirty at once, so the subscriber receives what the
        relay already holds (snapshot, patch or end) without waiting for a poll.
        """
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = TaskHub(task_id)
        cursor = Cursor(task, subscriber, seq)
        # A client that already holds an ended task's last state is owed nothing more.
        cursor.done = task.delivered_all(seq)
        task.cursors.add(cursor)
        self._cancel_timer(task_id)
        if not task.ended:
            task.stop_requested = False
            if task_id not in self._loops and not self._closing:
                self._start_loop(task)
        if self._on_subscribers is not None:
            self._on_subscribers(subscriber.transport, 1)
        subscriber.mark(cursor)
        return cursor

    def unsubscribe(self, cursor: Cursor) -> None:
        task = cursor.task
        if cursor not in task.cursors:
            return
        task.cursors.discard(cursor)
        if self._on_subscribers is not None:
            self._on_subscribers(cursor.subscriber.transport, -1)
        if not task.cursors and not task.ended and task.task_id in self._loops:
            self._set_timer(task.task_id, self._linger, self._linger_expired)

    def _start_loop(self, task: TaskHub) -> None:
        self._loops[task.task_id] = asyncio.create_task(
            self._run(task), name=f"poll {task.task_id}"
        )
        if self._on_loops is not None:
            self._on_loops(1)

    async def _run(self, task: TaskHub) -> None:
        try:
            await self._poll(task)
        except Exception:
            logger.exception("poll loop for task %s crashed", task.task_id)
            task.fail(ErrorCode.INTERNAL_ERROR, "the relay failed while polling this task")
        finally:
            del self._loops[task.task_id]
            if self._on_loops is not None:
                self._on_loops(-1)
            self._loop_finished(task)

    def _loop_finished(self, task: TaskHub) -> None:
        if self.tasks.get(task.task_id) is not task:
            return
        if task.ended:
            ttl = self._ended_ttl
            if task.state is None:
                ttl = min(ttl, NOT_FOUND_TTL)
            self._remember_ended(task.task_id)
            self._set_timer(task.task_id, ttl, self._forget)
        elif task.cursors and not self._closing:
            # A subscriber arrived while the loop was stopping: it needs a loop.
            task.stop_requested = False
            self._start_loop(task)
        else:
            del self.tasks[task.task_id]

    def _remember_ended(self, task_id: str) -> None:
        self._ended[task_id] = None
        while len(self._ended) > MAX_ENDED_TASKS:
            oldest = next(iter(self._ended))
            self._forget(oldest)

    def _linger_expired(self, task_id: str) -> None:
        self._timers.pop(task_id, None)
        task = self.tasks.get(task_id)
        if task is not None and not task.cursors:
            task.request_stop()

    def _forget(self, task_id: str) -> None:
        self._cancel_timer(task_id)
        self._ended.pop(task_id, None)
        task = self.tasks.get(task_id)
        if task is not None and task.ended:
            del self.tasks[task_id]

    def _set_timer(self, task_id: str, delay: float, callback: Callable[[str], None]) -> None:
        self._cancel_timer(task_id)
        loop = asyncio.get_running_loop()
        self._timers[task_id] = loop.call_later(delay, callback, task_id)

    def _cancel_timer(self, task_id: str) -> None:
        timer = self._timers.pop(task_id, None)
        if timer is not None:
            timer.cancel()

    async def close(self, grace: float = 2.0) -> None:
        """Stop every loop: between polls within `grace` seconds, cancelled after that."""
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self.tasks.values():
            task.shutting_down = True
            task.request_stop()
            for cursor in list(task.cursors):
                cursor.subscriber.close()
        loops = list(self._loops.values())
        if loops:
            _, pending = await asyncio.wait(loops, timeout=grace)
            for loop_task in pending:
                loop_task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
