"""Memory per idle subscriber: relay RSS at 0, 1k, 5k and 10k idle SSE / WebSocket subscribers.

Every subscriber watches one task that never changes (a queued task of
bench/fixed_upstream.py), so after its snapshot it is idle. RSS is VmRSS from
/proc/<pid>/status, read three times after the count settles (median). The baseline is
read after a warm-up round of 100 subscribers came and went, so lazily imported code and
first-use caches are not charged to subscribers. Subscribers are added in steps to the same
server, from separate load-client processes. Beside the relay: bench/minimal_server.py
(`--interval 0`: it never pushes), the stack's own cost of an open stream, and for SSE
its bare-ASGI stream (`raw`, without sse-starlette).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from typing import Any

from .common import (
    LoadGroup,
    Server,
    command_line,
    emit,
    log,
    start_fixed_upstream,
    start_minimal,
    start_relay,
    summary,
    table,
)
from .nchan import available as nchan_available
from .nchan import start_nchan

TARGET_KIB = 20.0
SSE_PATH = "/v1/tasks/{task}/events"
RAW_PATH = "/raw/v1/tasks/{task}/events"
NCHAN_PATHS = {"sse": SSE_PATH, "ws": "/ws/{task}"}
SETTLE = 2.0


def settled_rss(server: Server) -> int:
    time.sleep(SETTLE)
    reads = []
    for _ in range(3):
        reads.append(server.rss())
        time.sleep(0.2)
    return int(statistics.median(reads))


def run_one(kind: str, transport: str, levels: list[int], upstream: Server) -> dict[int, int]:
    """RSS in KiB at each subscriber count (0 included), on one fresh server."""
    server: Server
    if kind == "relay":
        server = start_relay(upstream.url, 1.0)
    elif kind == "nchan":
        server = start_nchan(0, transport, "idle-mem")
    else:
        server = start_minimal(0)
    path = {"raw": RAW_PATH, "nchan": NCHAN_PATHS[transport]}.get(kind, SSE_PATH)
    loads: list[LoadGroup] = []
    try:
        # nchan's subscribers are ready once served the channel's one message.
        warm_task = "idle-mem" if kind == "nchan" else "idle-warm"
        warm = LoadGroup(server.url, transport, [(warm_task, 100)], path=path)
        warm.wait_ready()
        warm.stop()
        time.sleep(1.0)  # past the relay's 2 s linger, with SETTLE
        rss = {0: settled_rss(server)}
        have = 0
        for level in levels:
            spec = [("idle-mem", level - have)]
            loads.append(LoadGroup(server.url, transport, spec, path=path))
            have += loads[-1].wait_ready()
            rss[level] = settled_rss(server)
            log(f"{kind} {transport}: {have} idle subscribers, RSS {rss[level] / 1024:.1f} MiB")
        return rss
    finally:
        for load in loads:
            load.stop()
        server.stop()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that every `finally` stops its servers and clients."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1000,5000,10000", help="subscriber counts")
    parser.add_argument("--reps", type=int, default=2, help="fresh relays per transport")
    parser.add_argument("--quick", action="store_true", help="up to 1,000, one repetition")
    parser.add_argument("--transports", default="sse,ws", help="sse, ws")
    parser.add_argument("--servers", default="relay,minimal,raw", help="relay, minimal, raw")
    parser.add_argument(
        "--nchan",
        choices=["auto", "on", "off"],
        default="auto",
        help="add nginx + nchan (bench/nchan.py) as a row; auto: where it is installed",
    )
    args = parser.parse_args()
    if args.quick:
        args.levels, args.reps = "1000", 1
    levels = sorted(int(n) for n in args.levels.split(",") if n)
    upstream = start_fixed_upstream()
    runs: dict[tuple[str, str], list[dict[int, int]]] = {}
    try:
        kinds = [k for k in args.servers.split(",") if k]
        if args.nchan == "on" or (args.nchan == "auto" and nchan_available()):
            kinds.append("nchan")
        for transport in args.transports.split(","):
            for kind in kinds:
                if kind == "raw" and transport != "sse":
                    continue
                reps = args.reps if kind == "relay" else 1
                runs[(kind, transport)] = [
                    run_one(kind, transport, levels, upstream) for _ in range(reps)
                ]
    finally:
        upstream.stop()
    rows: list[list[Any]] = []
    for (kind, transport), reps_rss in runs.items():
        for level in [0, *levels]:
            mib = [r[level] / 1024 for r in reps_rss]
            per = [(r[level] - r[0]) / level for r in reps_rss] if level else []
            verdict = ""
            if kind == "relay" and level:
                verdict = "met" if statistics.median(per) <= TARGET_KIB else "missed"
            rows.append(
                [
                    transport.upper(),
                    kind,
                    f"{level:,}",
                    summary(mib, 1),
                    summary(per, 1) if per else "",
                    verdict,
                ]
            )
    body = table(
        [
            "transport",
            "server",
            "idle subscribers",
            "RSS MiB",
            "KiB per subscriber (RSS - RSS at 0) / N",
            f"≤ {TARGET_KIB:g} KiB",
        ],
        rows,
    )
    body += (
        f"\n\nRelay: median (min-max) of {args.reps} fresh relays; minimal server: one run. "
        "raw: the minimal server's SSE stream as a bare ASGI app, without sse-starlette. "
        "nchan: nginx with the nchan module, one worker (bench/nchan.py), its RSS with the "
        "master's."
    )
    emit("Memory per idle subscriber", command_line(), body)


if __name__ == "__main__":
    main()
