"""The hub: every watched task's state, sequence numbers, recent history and subscribers.

`TaskHub` is one task: what the relay knows of it and the events that say so, each
encoded once however many subscribers it reaches (see `subscriber.py` for how a
subscriber catches up). `Hub` is all of them in this process: it starts a task's
poll loop with its first subscriber, tells the loop when the last one has been
gone for the linger, and forgets an ended task after its TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from .backend import Change
from .logs import about
from .patch import apply_patch, merge_patch
from .protocol import HISTORY_SIZE, TERMINAL, ErrorCode, Event, error_data
from .subscriber import Cursor, Subscriber

logger = logging.getLogger("relay.hub")

NOT_FOUND_TTL = 10.0
MAX_ENDED_TASKS = 10_000


class TaskHub:
    """Everything the relay knows about one task, and the subscribers that watch it."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.state: dict[str, Any] | None = None
        self.seq = 0
        self.cursors: set[TaskCursor] = set()
        self.ended = False
        self._history: deque[tuple[int, dict[str, Any]]] = deque(maxlen=HISTORY_SIZE)
        self._last_patch: Event | None = None
        self._last_patch_from = 0
        self._snapshot: Event | None = None
        self._notice: Event | None = None
        self._notice_gen = 0
        self._final: Event | None = None

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

    def apply(self, change: Change) -> bool:
        """Take a change polled by another node (or read back from the store).

        False when it is a patch that does not follow the state held (one was missed):
        the caller reads the whole state instead."""
        state, seq = change.state, change.seq
        if state is None and change.patch is not None and seq is not None:
            if seq <= self.seq:
                return True  # already held
            if self.state is None or seq != self.seq + 1:
                return False
            state = apply_patch(self.state, change.patch)
        published = state is not None and seq is not None and self.publish(state, seq, change.patch)
        if published and change.history:
            self.remember(change.history)
        if change.error is not None:
            code, message = ErrorCode(change.error["code"]), change.error["message"]
            if change.final:
                self.fail(code, message)
            else:
                self.report_unavailable(message)
        return True

    def remember(self, history: list[tuple[int, dict[str, Any]]]) -> None:
        """Add older states (oldest first) so that resumes from them get a patch."""
        known = {seq for seq, _ in self._history}
        older = [(seq, state) for seq, state in history if seq < self.seq and seq not in known]
        merged = sorted([*older, *self._history], key=lambda entry: entry[0])
        self._history = deque(merged[-HISTORY_SIZE:], maxlen=HISTORY_SIZE)

    def report_unavailable(
        self, message: str, code: ErrorCode = ErrorCode.UPSTREAM_UNAVAILABLE
    ) -> None:
        """Tell subscribers the upstream (or the cluster) is failing and the relay is
        retrying, once per outage."""
        if self.ended or (self._notice is not None and self._notice.data["code"] == code):
            return
        data = error_data(code, message, retrying=True)
        self._notice = Event("error", self.task_id, None, data)
        self._notice_gen += 1
        self._notify()

    def clear_notice(self, code: ErrorCode) -> None:
        """The outage `code` named is over: a new subscriber is not told of it any more
        (those told learn it from the next change)."""
        notice = self._notice
        if notice is not None and notice.data["code"] == code:
            self._notice = None

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
        notice = self._notice
        return notice is not None and notice.data["code"] == ErrorCode.UPSTREAM_UNAVAILABLE

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

    def catch_up(self, cursor: TaskCursor) -> list[Event]:
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


TaskCursor = Cursor[TaskHub]
"""A subscriber's place in one task of the hub."""


class LoopSignal:
    """What the hub tells a task's loop: whether this node still wants the task, or stop.

    The loop sleeps between polls on `sleep`, which any of these wakes early.
    """

    __slots__ = ("_wake", "shutting_down", "wanted")

    def __init__(self) -> None:
        self.wanted = True
        self.shutting_down = False
        self._wake = asyncio.Event()

    def want(self) -> None:
        """A subscriber arrived (again)."""
        self.wanted = True

    def withdraw(self) -> None:
        """The last subscriber has been gone for the linger."""
        self.wanted = False
        self._wake.set()

    def shut_down(self) -> None:
        self.shutting_down = True
        self._wake.set()

    def wake(self) -> None:
        """Something changed for the loop to look at now (a lease that may be free)."""
        self._wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep between polls; returns early when woken."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._wake.clear()


PollLoop = Callable[[TaskHub, LoopSignal], Coroutine[Any, Any, None]]


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
        self._tasks: dict[str, TaskHub] = {}
        self._loops: dict[str, tuple[asyncio.Task[None], LoopSignal]] = {}
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
    def task_count(self) -> int:
        """Tasks held in memory: watched, lingering, or ended and kept for late subscribers."""
        return len(self._tasks)

    @property
    def backing_off(self) -> int:
        return sum(1 for task in self._tasks.values() if task.unavailable)

    @property
    def subscriber_count(self) -> int:
        return sum(len(task.cursors) for task in self._tasks.values())

    def get(self, task_id: str) -> TaskHub | None:
        return self._tasks.get(task_id)

    def wake(self, task_id: str) -> None:
        """Wake the task's loop, if it has one (the cluster says its lease may be free)."""
        loop = self._loops.get(task_id)
        if loop is not None:
            loop[1].wake()

    def receive(self, change: Change) -> bool:
        """A change from another node of the cluster, for a task watched here."""
        task = self._tasks.get(change.task_id)
        return task.apply(change) if task is not None else True

    def subscribe(self, task_id: str, subscriber: Subscriber, seq: int | None = None) -> TaskCursor:
        """Add a subscriber to a task, starting its poll loop if it has none.

        The cursor is marked dirty at once, so the subscriber receives what the
        relay already holds (snapshot, patch or end) without waiting for a poll.
        """
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = TaskHub(task_id)
        cursor: TaskCursor = Cursor(task, subscriber, seq)
        # A client that already holds an ended task's last state is owed nothing more.
        cursor.done = task.delivered_all(seq)
        task.cursors.add(cursor)
        if not task.ended:
            # The linger timer, if any. An ended task keeps its forget timer: a late
            # subscriber must not keep it in memory for ever.
            self._cancel_timer(task_id)
            loop = self._loops.get(task_id)
            if loop is not None:
                loop[1].want()
            elif not self._closing:
                self._start_loop(task)
        if self._on_subscribers is not None:
            self._on_subscribers(subscriber.transport, 1)
        subscriber.mark(cursor)
        return cursor

    def unsubscribe(self, cursor: TaskCursor) -> None:
        task = cursor.task
        if cursor not in task.cursors:
            return
        task.cursors.discard(cursor)
        if self._on_subscribers is not None:
            self._on_subscribers(cursor.subscriber.transport, -1)
        if not task.cursors and not task.ended and task.task_id in self._loops:
            self._set_timer(task.task_id, self._linger, self._linger_expired)

    def _start_loop(self, task: TaskHub) -> None:
        signal = LoopSignal()
        loop = asyncio.create_task(self._run(task, signal), name=f"poll {task.task_id}")
        self._loops[task.task_id] = (loop, signal)
        if self._on_loops is not None:
            self._on_loops(1)

    async def _run(self, task: TaskHub, signal: LoopSignal) -> None:
        try:
            await self._poll(task, signal)
        except Exception:
            logger.exception(
                "poll loop for task %s crashed", task.task_id, extra=about(task.task_id)
            )
            task.fail(ErrorCode.INTERNAL_ERROR, "the relay failed while polling this task")
        finally:
            del self._loops[task.task_id]
            if self._on_loops is not None:
                self._on_loops(-1)
            self._loop_finished(task)

    def _loop_finished(self, task: TaskHub) -> None:
        if self._tasks.get(task.task_id) is not task:
            return
        if task.ended:
            ttl = self._ended_ttl
            if task.state is None:
                ttl = min(ttl, NOT_FOUND_TTL)
            self._remember_ended(task.task_id)
            self._set_timer(task.task_id, ttl, self._forget)
        elif task.cursors and not self._closing:
            # A subscriber arrived while the loop was stopping: it needs a loop.
            self._start_loop(task)
        else:
            del self._tasks[task.task_id]

    def _remember_ended(self, task_id: str) -> None:
        self._ended[task_id] = None
        while len(self._ended) > MAX_ENDED_TASKS:
            oldest = next(iter(self._ended))
            self._forget(oldest)

    def _linger_expired(self, task_id: str) -> None:
        self._timers.pop(task_id, None)
        task = self._tasks.get(task_id)
        loop = self._loops.get(task_id)
        if task is not None and not task.cursors and loop is not None:
            loop[1].withdraw()

    def _forget(self, task_id: str) -> None:
        self._cancel_timer(task_id)
        self._ended.pop(task_id, None)
        task = self._tasks.get(task_id)
        if task is not None and task.ended:
            del self._tasks[task_id]

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
        for _, signal in self._loops.values():
            signal.shut_down()
        for task in self._tasks.values():
            for cursor in list(task.cursors):
                cursor.subscriber.close()
        loops = [loop for loop, _ in self._loops.values()]
        if loops:
            _, pending = await asyncio.wait(loops, timeout=grace)
            for loop_task in pending:
                loop_task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
