"""Where a relay's CPU goes per upstream call, from a CPU-time cProfile (bench.economy --profile).

    python -m bench.cprofile_groups DIR/cpu-upstream-1-3000.pstats --us-per-call 330

Sums each function's own time (cProfile's `tottime`, on the process CPU clock) into the
parts of the call path, and scales the shares to the CPU per call measured without the
profiler (cProfile's own cost inflates every function call, so shares are indicative).
"""

from __future__ import annotations

import argparse
import pstats
from typing import Any

# (part, matcher on "file:function"), first match wins.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("upstream transport (relay/upstream/transport.py)", ("upstream/transport.py",)),
    ("httpx Request / Response / Headers objects", ("httpx/",)),
    ("signing (relay/upstream/signing.py, hmac, md5, uuid)", ("signing.py", "hmac", "md5", "uuid")),
    (
        "JSON reading: parse, envelope, nulls (upstream/client.py, json, patch.drop_nulls)",
        (
            "upstream/client.py:parse_json",
            "upstream/client.py:read_envelope",
            "upstream/client.py:nesting_depth",
            "upstream/client.py:plain_unicode",
            "upstream/client.py:finite_float",
            "json/decoder",
            "drop_nulls",
            "detect_encoding",
            "json/__init__.py:loads",
        ),
    ),
    ("upstream client call (upstream/client.py: _call, _post, read_limited)", ("upstream/client.py",)),
    ("Redis backend (relay/cluster/backend.py, redis)", ("cluster/backend.py", "/redis/")),
    ("diff (relay/patch.py: merge_patch, same_json)", ("patch.py",)),
    (
        "publish and fan-out (hub, subscriber, protocol events)",
        ("hub.py", "subscriber.py", "protocol.py"),
    ),
    (
        "SSE stream and uvicorn/starlette writes",
        ("sse.py", "sse_starlette", "uvicorn", "starlette"),
    ),
    ("metrics (prometheus_client)", ("metrics.py", "prometheus_client")),
    (
        "poll loop (poll_loop.py, backend.py, LoopSignal.sleep's wait_for)",
        (
            "poll_loop.py",
            "backend.py",
            "tasks.py:wait_for",
            "tasks.py:_cancel_and_wait",
            "tasks.py:_release_waiter",
            "locks.py:wait",
        ),
    ),
    ("JSON encoding (json.dumps)", ("json/encoder", "json/__init__.py:dumps")),
    (
        "asyncio (tasks, futures, locks, slots, timers) and the event loop",
        (
            "asyncio",
            "uvloop",
            "locks.py",
            "tasks.py",
            "events.py",
            "_weakrefset",
            "builtins.isinstance",
            "<built-in",
            "<method",
        ),
    ),
]


def group_of(key: Any) -> str:
    filename, _, name = key
    where = f"{filename}:{name}"
    for part, needles in GROUPS:
        if any(n in where for n in needles):
            return part
    return "other"


# Helpers whose time belongs to whoever called them: C functions (`~`), context managers,
# cached properties, ABC and typing checks.
SHARED = ("~", "contextlib.py", "functools.py", "<frozen abc>", "typing.py", "base64.py")


def charge(stats: Any) -> dict[str, float]:
    """Own time per part; a shared helper's time goes to its callers' parts, by call edge."""
    totals: dict[str, float] = {}
    for key, (_, _, tottime, _, callers) in stats.stats.items():
        if key[0].startswith(SHARED) or key[0] == "~":
            edges = {caller: edge[2] for caller, edge in callers.items()}
            spread = sum(edges.values())
            if spread > 0:
                for caller, share in edges.items():
                    part = group_of(caller)
                    totals[part] = totals.get(part, 0.0) + tottime * share / spread
                continue
        part = group_of(key)
        totals[part] = totals.get(part, 0.0) + tottime
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pstats", help="a .pstats file written by bench/relay_transport.py")
    parser.add_argument("--us-per-call", type=float, required=True, help="measured, no profiler")
    args = parser.parse_args()
    totals = charge(pstats.Stats(args.pstats))
    whole = sum(totals.values()) or 1.0
    print("| part of the relay's work | share of its CPU | µs per upstream call |")
    print("|---|---|---|")
    for part, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        share = seconds / whole
        print(f"| {part} | {share * 100:.0f}% | {share * args.us_per_call:.0f} |")


if __name__ == "__main__":
    main()
