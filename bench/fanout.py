"""Fan-out cost and delivery latency: the relay against the stack's own limit, side by side.

One hot task whose state changes on every poll (bench/fixed_upstream.py stamps each answer
with `sentAt`), N subscribers on it, over SSE and over WebSocket. Beside each relay run, in
the same run, bench/minimal_server.py pushes the same frames at the same rate to the same
number of clients with no relay logic. The update interval grows with N so every run
delivers about 10,000 messages/s (1k: 0.1 s, 5k: 0.5 s, 10k: 1 s), which keeps the server
below one core on a 2-core machine shared with the load clients.

Measured per window: server CPU time (/proc/<pid>/stat utime+stime) per delivered message,
messages delivered per second, and the load clients' own CPU per message. Latency: receive
time minus `sentAt` for every delivery (p50, p99, max), and per update the time until its
last subscriber had it. Load clients are separate processes of at most 5,000 sockets.

`--profile DIR` runs py-spy on each relay for one extra window after the measured ones
(py-spy's sampling would inflate the CPU figures) and writes a flame graph per run.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import (
    LoadGroup,
    Server,
    command_line,
    emit,
    log,
    median,
    percentile,
    start_fixed_upstream,
    start_minimal,
    start_relay,
    summary,
    table,
)

MESSAGES_PER_SECOND = 10_000
TARGET_RATIO = 1.3
TARGET_P99_MS = 100.0
SAMPLE_EVERY = 0.025


def interval_for(n: int) -> float:
    return max(0.1, round(n / MESSAGES_PER_SECOND, 3))


def run_one(
    kind: str,
    transport: str,
    n: int,
    upstream: Server,
    *,
    reps: int,
    window: float,
    warmup: float,
    profile: Path | None,
) -> dict[str, Any]:
    interval = interval_for(n)
    server = start_relay(upstream.url, interval) if kind == "relay" else start_minimal(interval)
    group: LoadGroup | None = None
    try:
        task = f"hot-{kind}-{transport}-{n}-{time.monotonic_ns()}"
        started = time.monotonic()
        group = LoadGroup(server.url, transport, [(task, n)], latency=True)
        ready = group.wait_ready()
        log(f"{kind} {transport} {n}: {ready} subscribers in {time.monotonic() - started:.1f} s")
        time.sleep(warmup)
        group.command("reset")
        windows = measure_windows(server, group, reps, window, interval)
        answers = group.command("lat")
        rss = server.rss()
        if profile is not None and kind == "relay":
            record_profile(server, profile / f"fanout-{transport}-{n}.svg", window)
        latency = latency_stats(answers, ready)
        log(
            f"  {median(w['us_per_msg'] for w in windows):.1f} us/msg, "
            f"{median(w['rate'] for w in windows):.0f} msg/s, p99 {latency['p99']:.1f} ms, "
            f"{sum(w['aligned'] for w in windows):.0f} of {len(windows)} windows aligned"
        )
        return {
            "kind": kind,
            "transport": transport,
            "n": n,
            "ready": ready,
            "interval": interval,
            "windows": windows,
            "latency": latency,
            "rss_kib": rss,
        }
    finally:
        if group is not None:
            group.stop()
        server.stop()


def measure_windows(
    server: Server, group: LoadGroup, reps: int, window: float, interval: float
) -> list[dict[str, float]]:
    """CPU per message over `reps` windows whose edges fall between two fan-outs.

    Messages arrive in bursts of N (one per update), so a window cut in the middle of a
    burst would count a fraction of an update against the CPU of all of it. The run is
    sampled every SAMPLE_EVERY seconds (server CPU, messages delivered, load-client CPU);
    each window edge is then moved to the nearest quiet sample, one with no delivery in
    the sampling steps on either side of it (if none is within one interval, it stays).
    """
    samples: list[tuple[float, float, float, float]] = []
    started = time.monotonic()
    while True:
        now = time.monotonic()
        events = sum(c.command("stats")["events"] for c in group.clients)
        samples.append((now, server.cpu(), events, group.cpu()))
        if now - started >= reps * window:
            break
        time.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - now)))
    quiet = [
        i
        for i in range(1, len(samples) - 1)
        if samples[i - 1][2] == samples[i][2] == samples[i + 1][2]
    ]

    def edge(target: float) -> int:
        nearest = min(range(len(samples)), key=lambda i: abs(samples[i][0] - target))
        near_quiet = [i for i in quiet if abs(samples[i][0] - target) <= interval]
        if near_quiet:
            return min(near_quiet, key=lambda i: abs(samples[i][0] - target))
        return nearest

    edges = [edge(started + k * window) for k in range(reps + 1)]
    windows = []
    for a, b in itertools.pairwise(edges):
        (t0, c0, e0, l0), (t1, c1, e1, l1) = samples[a], samples[b]
        messages = max(e1 - e0, 1)
        windows.append(
            {
                "us_per_msg": (c1 - c0) / messages * 1e6,
                "rate": messages / max(t1 - t0, 1e-9),
                "cpu_share": (c1 - c0) / max(t1 - t0, 1e-9),
                "client_us": (l1 - l0) / messages * 1e6,
                "aligned": float(a in quiet and b in quiet),
            }
        )
    return windows


def latency_stats(answers: list[dict[str, Any]], subscribers: int) -> dict[str, float]:
    samples = sorted(s for answer in answers for s in answer["samples"])
    updates: dict[str, list[float]] = {}
    for answer in answers:
        for stamp, (count, slowest) in answer["updates"].items():
            merged = updates.setdefault(stamp, [0, 0.0])
            merged[0] += count
            merged[1] = max(merged[1], slowest)
    # Only updates every subscriber received inside the measured windows.
    last = sorted(slowest for count, slowest in updates.values() if count >= subscribers)
    return {
        "p50": percentile(samples, 50),
        "p99": percentile(samples, 99),
        "max": samples[-1] if samples else float("nan"),
        "last_p50": percentile(last, 50),
        "last_max": last[-1] if last else float("nan"),
        "updates": len(last),
        "samples": len(samples),
    }


def record_profile(server: Server, path: Path, seconds: float) -> None:
    """A py-spy flame graph (`path`, SVG) and collapsed stacks with a summary (`.txt`)."""
    spy = shutil.which("py-spy")
    if spy is None:
        log("py-spy is not installed (pip install py-spy): no profile")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".txt")
    for fmt, out in (("flamegraph", path), ("raw", raw)):
        argv = [spy, "record", "--pid", str(server.pid), "--duration", str(max(1, round(seconds)))]
        argv += ["--rate", "250", "--nonblocking", "--format", fmt, "-o", str(out)]
        result = subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=False)
        if result.returncode != 0:
            log(f"  py-spy failed: {result.stderr.decode(errors='replace')[-300:]}")
            return
    summary_path = path.with_suffix(".top.txt")
    summary_path.write_text(profile_summary(raw.read_text()))
    log(f"  profile: {path}, {raw}, {summary_path}")


def profile_summary(collapsed: str, top: int = 40) -> str:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples", "", "self %  function"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{count / total * 100:6.1f}  {frame}")
    lines += ["", "inclusive %  function"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{count / total * 100:6.1f}  {frame}")
    return "\n".join(lines) + "\n"


def report(results: list[dict[str, Any]], command: str) -> str:
    by_key = {(r["kind"], r["transport"], r["n"]): r for r in results}
    cpu_rows = []
    lat_rows = []
    for (kind, transport, n), r in sorted(by_key.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if kind != "relay":
            continue
        base = by_key.get(("minimal", transport, n))
        relay_us = [w["us_per_msg"] for w in r["windows"]]
        base_us = [w["us_per_msg"] for w in base["windows"]] if base else []
        ratios = [a / b for a, b in zip(relay_us, base_us, strict=False)]
        verdict = "n/a"
        if base_us:
            ratio = median(relay_us) / median(base_us)
            verdict = f"**{ratio:.2f}x** {'met' if ratio <= TARGET_RATIO else 'missed'}"
        for row_kind, row in (("relay", r), ("minimal", base)):
            if row is None:
                continue
            ws = row["windows"]
            cpu_rows.append(
                [
                    f"{transport.upper()} {n:,}",
                    f"{row_kind} ({row['interval']:g} s)",
                    summary((w["us_per_msg"] for w in ws), 1),
                    summary((w["rate"] for w in ws), 0),
                    summary((w["cpu_share"] * 100 for w in ws), 0),
                    f"{median(w['client_us'] for w in ws):.1f}",
                    f"{row['rss_kib'] / 1024:.0f}",
                    (verdict + f" (windows {summary(ratios, 2)})") if row_kind == "relay" else "",
                ]
            )
            lat = row["latency"]
            lat_rows.append(
                [
                    f"{transport.upper()} {n:,}",
                    row_kind,
                    f"{lat['p50']:.1f}",
                    f"{lat['p99']:.1f}",
                    f"{lat['max']:.1f}",
                    f"{lat['last_p50']:.1f}",
                    f"{lat['last_max']:.1f}",
                    f"{lat['updates']} / {lat['samples']:,}",
                ]
            )
    cpu_table = table(
        [
            "subscribers",
            "server (interval)",
            "CPU µs / message",
            "messages / s",
            "server CPU %",
            "client µs / msg",
            "RSS MiB",
            "relay / minimal",
        ],
        cpu_rows,
    )
    lat_table = table(
        [
            "subscribers",
            "server",
            "p50 ms",
            "p99 ms",
            "max ms",
            "last subscriber, median update ms",
            "last subscriber, worst update ms",
            "updates / deliveries",
        ],
        lat_rows,
    )
    out = emit("Fan-out cost (one hot task)", command, cpu_table)
    out += emit("Delivery latency (same runs)", command, lat_table)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="subscriber counts")
    parser.add_argument("--transports", default="sse,ws")
    parser.add_argument("--reps", type=int, default=3, help="measured windows per run")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy flame graphs here")
    parser.add_argument("--quick", action="store_true", help="1,000 subscribers, 2 windows of 3 s")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps, args.window = "1000", 2, 3.0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    transports = [t for t in args.transports.split(",") if t]
    if max(sizes) > 15_000:
        parser.error("at most 15,000 subscribers: a process holds at most 20,000 sockets")
    upstream = start_fixed_upstream()
    results = []
    try:
        for n in sizes:
            for transport in transports:
                for kind in ("relay", "minimal"):
                    results.append(
                        run_one(
                            kind,
                            transport,
                            n,
                            upstream,
                            reps=args.reps,
                            window=args.window,
                            warmup=args.warmup,
                            profile=args.profile,
                        )
                    )
    finally:
        upstream.stop()
    report(results, command_line())


if __name__ == "__main__":
    main()
