"""The global upstream budget: calls per second across all poll loops, shared fairly."""

from __future__ import annotations

import asyncio
import time


class RateBudget:
    """Spaces upstream calls at least `1/rate` seconds apart, first come, first served.

    Loops queue on a FIFO lock, so when there are more tasks than the budget allows,
    every task's interval stretches alike: none is polled twice while another waits.
    A `429` pauses the whole relay for the upstream's `Retry-After`.
    """

    def __init__(self, rate: float | None) -> None:
        self._spacing = 1.0 / rate if rate else 0.0
        self._next_at = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waiting = 0

    async def acquire(self) -> None:
        """Wait for this call's turn."""
        if not self._spacing and time.monotonic() >= self._paused_until:
            return
        self.waiting += 1
        try:
            async with self._lock:
                now = time.monotonic()
                start = max(now, self._next_at, self._paused_until)
                if start > now:
                    await asyncio.sleep(start - now)
                self._next_at = start + self._spacing
        finally:
            self.waiting -= 1

    def pause(self, seconds: float) -> None:
        """Hold every call back for `seconds` (the upstream said it is overloaded)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())
