"""Waiting before trying again: capped exponential backoff with jitter, and Retry-After."""

from __future__ import annotations

import math
import random
import time
from email.utils import parsedate_to_datetime


def backoff(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after `failures` faults in a row (1 or more).

    A random time between half and all of `base * 2**(failures - 1)`, at most `cap`:
    the jitter spreads the retries of many clients that failed together.
    """
    ceiling = min(cap, base * 2 ** min(max(failures, 1) - 1, 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header in seconds (delay-seconds or an HTTP date); None if absent
    or malformed."""
    raw = (value or "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            at = parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        seconds = at - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None
