"""The poll loop: one per watched task, polling upstream until the task ends or nobody watches.

The same loop serves a relay alone and a node of a cluster: the `Backend` says
whether this node may poll (it holds the task's lease) and takes every change it
polled. A node that may not poll follows: it keeps its interest recorded and
reads the stored state now and then, in case the polling node went quiet.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend, Change
from .hub import LoopSignal, TaskHub
from .logs import about
from .patch import merge_patch
from .protocol import ErrorCode
from .retry import backoff
from .upstream import TaskNotFound, Unauthorized, UpstreamClient, UpstreamUnavailable

logger = logging.getLogger("relay.poll")

CLUSTER_UNAVAILABLE = (
    "this relay cannot reach Redis, so it can neither poll nor follow the task; retrying"
)


@dataclass(frozen=True)
class PollPolicy:
    """How often to poll a task, and how to back off when the upstream fails.

    A running task is polled every `interval`; a waiting one every `interval` times
    (1 + its queue position), at most `waiting_max`. Every interval gets ±`jitter`
    so tasks started together do not poll in lockstep.
    """

    interval: float = 1.0
    waiting_max: float = 5.0
    jitter: float = 0.1
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    fetch_result: bool = True
    request_timeout: float = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def next_interval(self, state: dict[str, Any]) -> float:
        delay = self.interval
        if state.get("status") == "waiting":
            queue = state.get("lastQueueRemaining")
            ahead = queue if isinstance(queue, int) and not isinstance(queue, bool) else 1
            delay = min(self.interval * (1 + max(ahead, 0)), max(self.waiting_max, self.interval))
        return delay * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Capped exponential backoff with jitter; never shorter than the upstream asked."""
        delay = backoff(failures, self.backoff_base, self.backoff_max, self.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


@dataclass
class Polled:
    """What one poll brought: a state, a final error, or a fault to retry after `delay`."""

    state: dict[str, Any] | None = None
    final: tuple[ErrorCode, str] | None = None
    fault: str | None = None
    delay: float = 0.0


async def poll_once(
    task_id: str, upstream: UpstreamClient, policy: PollPolicy, failures: int
) -> Polled:
    """One upstream call (plus the result of a succeeded task), read into what to do next.

    `failures` counts the faults in a row before this call, for the backoff.
    """
    try:
        state = await upstream.progress(task_id)
    except TaskNotFound as exc:
        return Polled(final=(ErrorCode.TASK_NOT_FOUND, str(exc)))
    except Unauthorized as exc:
        logger.error("task %s: %s; check the AccessKey pair", task_id, exc, extra=about(task_id))
        if exc.clock_skew:
            logger.warning("the upstream says our timestamp is off: is this host's clock right?")
        return Polled(
            final=(ErrorCode.UNAUTHORIZED, "the upstream refused the relay's credentials")
        )
    except UpstreamUnavailable as exc:
        delay = policy.backoff(failures + 1, exc.retry_after)
        logger.warning(
            "task %s: %s; retry %d in %.1fs",
            task_id,
            exc,
            failures + 1,
            delay,
            extra=about(task_id),
        )
        return Polled(fault=f"{exc}; retrying", delay=delay)
    except Exception:
        # Whatever the upstream sent, the loop must live on to deliver the final state.
        delay = policy.backoff(failures + 1)
        logger.exception(
            "task %s: unexpected error reading the upstream", task_id, extra=about(task_id)
        )
        return Polled(fault="the relay could not read the upstream's answer; retrying", delay=delay)
    if state["status"] == "succeeded" and policy.fetch_result:
        state = await with_result(upstream, task_id, state, policy.request_timeout)
    return Polled(state=state, delay=policy.next_interval(state))


async def poll_task(
    task: TaskHub,
    signal: LoopSignal,
    backend: Backend,
    upstream: UpstreamClient,
    policy: PollPolicy,
) -> None:
    """Poll one task until it ends or no node wants it; follow it while another node polls.

    A stop is only ever noticed between calls: a call cut off in flight loses its
    answer, and with httpx's own transport it could leak a connection-pool slot.
    """
    task_id = task.task_id
    owner = False
    failures = 0
    next_poll = 0.0
    await sync(task, backend)
    looked = time.monotonic()  # when the stored state was last read (as a follower's look)
    try:
        while not task.ended and not signal.shutting_down:
            if not backend.healthy:
                owner = False  # the backend checks its lease again before a poll
                await signal.sleep(backend.check_interval)
                if not backend.healthy and not signal.shutting_down:
                    task.report_unavailable(CLUSTER_UNAVAILABLE, ErrorCode.CLUSTER_UNAVAILABLE)
                continue
            task.clear_notice(ErrorCode.CLUSTER_UNAVAILABLE)
            if not await backend.interest(task_id, signal.wanted):
                return  # nobody anywhere watches it any more
            if not owner:
                if time.monotonic() - looked >= backend.follow_interval:
                    # Following: changes come from the channel; this look (the stored state
                    # and who holds the lease) is the net under it, before trying the lease.
                    await sync(task, backend)
                    looked = time.monotonic()
                owner = await backend.acquire(task_id)
                if owner:
                    await sync(task, backend)  # continue from what the last holder stored
                if not owner:
                    if not signal.wanted:
                        return  # another node polls it for its own subscribers
                    await signal.sleep(backend.follow_interval)  # woken if the lease frees
                    continue
                next_poll = 0.0
            elif not await backend.renew(task_id):
                owner = False
                continue
            if time.monotonic() >= next_poll:
                async with backend.keep_lease(task_id):
                    outcome = await poll_and_store(task, backend, upstream, policy, failures)
                if outcome is None:
                    owner, failures = False, 0
                    continue
                failures, delay = outcome
                next_poll = time.monotonic() + delay
            if not task.ended:
                await signal.sleep(next_poll - time.monotonic())
    finally:
        # Whatever this loop believed, a lease the backend still holds is given up.
        await backend.release(task_id)
        await backend.interest(task_id, False)


async def sync(task: TaskHub, backend: Backend) -> None:
    """Bring the task up to what the backend stores (a cluster's stored state)."""
    stored = await backend.load(task.task_id)
    if stored is not None:
        task.apply(stored)


async def poll_and_store(
    task: TaskHub, backend: Backend, upstream: UpstreamClient, policy: PollPolicy, failures: int
) -> tuple[int, float] | None:
    """One poll by the polling node: (faults in a row, delay to the next poll).

    None when the backend refused the change: this node lost the task's lease.
    """
    task_id = task.task_id
    polled = await poll_once(task_id, upstream, policy, failures)
    if polled.final is not None:
        code, message = polled.final
        error = {"code": code.value, "message": message}
        if not await backend.store(Change(task_id, error=error, final=True)):
            return None
        task.fail(code, message)
        return 0, polled.delay
    if polled.fault is not None:
        if not task.unavailable:
            error = {"code": ErrorCode.UPSTREAM_UNAVAILABLE.value, "message": polled.fault}
            if not await backend.store(Change(task_id, error=error)):
                return None
        task.report_unavailable(polled.fault)
        return failures + 1, polled.delay
    assert polled.state is not None
    # One diff serves three purposes: is it a change, what to store, what to push.
    patch = merge_patch(task.state, polled.state) if task.state is not None else None
    if patch is None or patch:
        seq = task.next_seq()
        if not await backend.store(Change(task_id, seq, polled.state, patch)):
            return None
        task.publish(polled.state, seq=seq, patch=patch)
    return 0, polled.delay


async def with_result(
    upstream: UpstreamClient, task_id: str, state: dict[str, Any], time_limit: float
) -> dict[str, Any]:
    """The final state with `comfy_get_result`'s answer under `result`.

    Two tries within `time_limit` seconds in all; after that the end goes out without it.
    """
    deadline = time.monotonic() + time_limit
    for attempt in (1, 2):
        if time.monotonic() >= deadline:
            break
        try:
            return {**state, "result": await upstream.result(task_id, deadline)}
        except (UpstreamUnavailable, TaskNotFound, Unauthorized) as exc:
            logger.warning(
                "task %s: result fetch %d failed: %s", task_id, attempt, exc, extra=about(task_id)
            )
    return state
