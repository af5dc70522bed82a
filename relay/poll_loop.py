"""The poll loop: one per watched task, polling upstream until the task ends or nobody watches."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from .hub import TaskHub
from .protocol import ErrorCode
from .upstream import TaskNotFound, Unauthorized, UpstreamClient, UpstreamUnavailable

logger = logging.getLogger("relay.poll")


@dataclass(frozen=True)
class PollPolicy:
    interval: float = 1.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """Capped exponential backoff with jitter; never shorter than the upstream asked."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** min(failures - 1, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


async def poll_task(task: TaskHub, upstream: UpstreamClient, policy: PollPolicy) -> None:
    """Poll one task until it ends or its hub asks the loop to stop.

    A stop is only ever noticed between calls: cancelling an httpx request in
    flight can leak a connection-pool slot.
    """
    failures = 0
    while not task.stop_requested:
        try:
            state = await upstream.progress(task.task_id)
        except TaskNotFound as exc:
            task.fail(ErrorCode.TASK_NOT_FOUND, str(exc))
            return
        except Unauthorized as exc:
            logger.error("task %s: %s; check the AccessKey pair", task.task_id, exc)
            if "timestamp" in str(exc).lower():
                logger.warning(
                    "the upstream says our timestamp is off: is this host's clock right?"
                )
            task.fail(ErrorCode.UNAUTHORIZED, "the upstream refused the relay's credentials")
            return
        except UpstreamUnavailable as exc:
            failures += 1
            delay = policy.backoff(failures, exc.retry_after)
            logger.warning("task %s: %s; retry %d in %.1fs", task.task_id, exc, failures, delay)
            task.report_unavailable(f"{exc}; retrying")
        else:
            failures = 0
            task.publish(state)
            if task.ended:
                return
            delay = policy.interval
        await task.sleep(delay)
