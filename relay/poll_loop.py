"""The poll loop: one per watched task, polling upstream until the task ends or nobody watches."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from .hub import TaskHub
from .protocol import ErrorCode
from .upstream import TaskNotFound, Unauthorized, UpstreamClient, UpstreamUnavailable

logger = logging.getLogger("relay.poll")


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

    def next_interval(self, state: dict[str, Any]) -> float:
        delay = self.interval
        if state.get("status") == "waiting":
            queue = state.get("lastQueueRemaining")
            ahead = queue if isinstance(queue, int) and not isinstance(queue, bool) else 1
            delay = min(self.interval * (1 + max(ahead, 0)), max(self.waiting_max, self.interval))
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Capped exponential backoff with jitter; never shorter than the upstream asked."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** min(failures - 1, 30))
        delay = random.uniform(ceiling / 2, ceiling)
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
        logger.error("task %s: %s; check the AccessKey pair", task_id, exc)
        if exc.clock_skew:
            logger.warning("the upstream says our timestamp is off: is this host's clock right?")
        return Polled(
            final=(ErrorCode.UNAUTHORIZED, "the upstream refused the relay's credentials")
        )
    except UpstreamUnavailable as exc:
        delay = policy.backoff(failures + 1, exc.retry_after)
        logger.warning("task %s: %s; retry %d in %.1fs", task_id, exc, failures + 1, delay)
        return Polled(fault=f"{exc}; retrying", delay=delay)
    except Exception:
        # Whatever the upstream sent, the loop must live on to deliver the final state.
        delay = policy.backoff(failures + 1)
        logger.exception("task %s: unexpected error reading the upstream", task_id)
        return Polled(fault="the relay could not read the upstream's answer; retrying", delay=delay)
    if state["status"] == "succeeded" and policy.fetch_result:
        state = await with_result(upstream, task_id, state, policy.request_timeout)
    return Polled(state=state, delay=policy.next_interval(state))


async def poll_task(task: TaskHub, upstream: UpstreamClient, policy: PollPolicy) -> None:
    """Poll one task until it ends or its hub asks the loop to stop.

    A stop is only ever noticed between calls: cancelling an httpx request in
    flight can leak a connection-pool slot.
    """
    failures = 0
    while not task.stop_requested:
        polled = await poll_once(task.task_id, upstream, policy, failures)
        if polled.final is not None:
            task.fail(*polled.final)
            return
        if polled.fault is not None:
            failures += 1
            task.report_unavailable(polled.fault)
        else:
            failures = 0
            assert polled.state is not None
            task.publish(polled.state)
            if task.ended:
                return
        await task.sleep(polled.delay)


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
            logger.warning("task %s: result fetch %d failed: %s", task_id, attempt, exc)
    return state
