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

`--tasks T` spreads the N subscribers over T tasks instead (N/T each; `--sizes 10000
--tasks 1000` is 1,000 tasks x 10 subscribers). Every task then changes every
`--task-interval` seconds (default 5 s: 1,000 tasks cost the relay 200 upstream calls/s,
affordable on 2 cores), so N / interval messages/s; the minimal server (`--per-task`) keeps a
broadcast per task, made when its first client comes, pushing at that interval from a random
phase. The relay's CPU then includes polling the upstream: the table shows the upstream
calls/s it made in the measured windows (the fixed upstream's `GET /stats`). Windows default
to one interval (each task counts about once per window); their edges are not moved, since
with many tasks at random phases deliveries never pause.

`--profile DIR` runs py-spy on each relay for one extra window after the measured ones
(py-spy's sampling would inflate the CPU figures) and writes a flame graph per run.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    LOG_DIR,
    LoadGroup,
    Server,
    collapsed_samples,
    command_line,
    emit,
    http_json,
    log,
    median,
    percentile,
    read_gc,
    start_fixed_upstream,
    start_minimal,
    start_relay,
    summary,
    table,
)
from .nchan import available as nchan_available
from .nchan import start_nchan

MESSAGES_PER_SECOND = 10_000
# The relay's CPU per delivered message against the stack's own limit, side by side: SSE
# against the bare ASGI stream (`raw`), WebSocket against the minimal WebSocket server.
TARGET_RATIO = {"sse": 1.15, "ws": 1.2}
BASELINE = {"sse": "raw", "ws": "minimal"}
TARGET_P99_MS = 300.0  # one update to 10,000 subscribers of one task, in one process
TARGET_P99_AT = 10_000
LABELS = {
    "relay": "relay",
    "minimal": "minimal",
    "raw": "raw ASGI, no sse-starlette",
    "nchan": "nginx + nchan",
}
SAMPLE_EVERY = 0.025


def interval_for(n: int) -> float:
    return max(0.1, round(n / MESSAGES_PER_SECOND, 3))


def scenario(transport: str, n: int, tasks: int) -> str:
    """A row label: `SSE 10,000` (one hot task) or `SSE 1,000 tasks x 10`."""
    if tasks == 1:
        return f"{transport.upper()} {n:,}"
    return f"{transport.upper()} {tasks:,} tasks x {n // tasks:,}"


def upstream_calls(upstream: Server) -> int:
    return int(http_json("GET", upstream.url + "/stats")["total"])


def run_one(
    kind: str,
    transport: str,
    n: int,
    upstream: Server,
    *,
    tasks: int = 1,
    task_interval: float = 5.0,
    reps: int,
    window: float,
    warmup: float,
    profile: Path | None,
    gc: bool,
    relay_gc: list[str],
) -> dict[str, Any]:
    interval = interval_for(n) if tasks == 1 else task_interval
    name = f"{kind}-{transport}-{n}" + (f"-{tasks}tasks" if tasks > 1 else "")
    gc_path = LOG_DIR / f"gc-{name}-{time.monotonic_ns()}.json" if gc else None
    prefix = f"hot-{kind}-{transport}-{n}-{time.monotonic_ns()}"
    server: Server
    if kind == "relay":
        server = start_relay(upstream.url, interval, gc_stats=gc_path, gc_options=relay_gc)
    elif kind == "nchan":
        server = start_nchan(interval, transport, prefix)
    else:
        server = start_minimal(interval, gc_stats=gc_path, per_task=tasks > 1)
    group: LoadGroup | None = None
    try:
        if tasks == 1:
            spec = [(prefix, n)]
        else:
            spec = [(f"{prefix}-{i}", n // tasks) for i in range(tasks)]
        started = time.monotonic()
        path = {
            "raw": "/raw/v1/tasks/{task}/events",
            "nchan": "/v1/tasks/{task}/events" if transport == "sse" else "/ws/{task}",
        }.get(kind, "/v1/tasks/{task}/events")
        group = LoadGroup(server.url, transport, spec, latency=True, path=path)
        ready = group.wait_ready()
        log(f"{kind} {transport} {name}: {ready} subscribers in {time.monotonic() - started:.1f} s")
        time.sleep(warmup)
        group.command("reset")
        time.sleep(0.3 if gc else 0)  # the wrapper writes its totals at most every 0.2 s
        gc0, events0 = read_gc(gc_path), group.stats()["events"]
        calls0, calls_t0 = upstream_calls(upstream), time.monotonic()
        # With many tasks deliveries never pause: no quiet edges to look for.
        windows = measure_windows(server, group, reps, window, interval if tasks == 1 else 0.0)
        calls1, calls_t1 = upstream_calls(upstream), time.monotonic()
        time.sleep(0.3 if gc else 0)
        gc1, events1 = read_gc(gc_path), group.stats()["events"]
        gc_cost = {k: gc1[k] - gc0[k] for k in gc1}
        if gc_cost:
            messages = max(events1 - events0, 1)
            gc_cost["us_per_msg"] = gc_cost["seconds"] / messages * 1e6
            gc_cost["full_us_per_msg"] = gc_cost["full_seconds"] / messages * 1e6
            gc_cost["full_max_ms"] = gc1["full_max_ms"]
        answers = group.command("lat")
        rss = server.rss()
        if profile is not None:
            path = profile / f"fanout-{name}.svg"
            cost = median(w["us_per_msg"] for w in windows)
            record_profile(server, path, max(window, 20.0), cost)
        # An update counts as delivered to all once its task's subscribers all had it.
        per_update = ready if tasks == 1 else (n // tasks) * ready // n
        latency = latency_stats(answers, per_update)
        calls_per_s = (calls1 - calls0) / max(calls_t1 - calls_t0, 1e-9)
        log(
            f"  {median(w['us_per_msg'] for w in windows):.1f} us/msg, "
            f"{median(w['rate'] for w in windows):.0f} msg/s, p99 {latency['p99']:.1f} ms, "
            f"{calls_per_s:.0f} upstream calls/s"
            + (
                f", {sum(w['aligned'] for w in windows):.0f} of {len(windows)} windows aligned"
                if tasks == 1
                else ""
            )
        )
        return {
            "kind": kind,
            "transport": transport,
            "n": n,
            "tasks": tasks,
            "ready": ready,
            "interval": interval,
            "upstream_calls_per_s": calls_per_s,
            "windows": windows,
            "latency": latency,
            "rss_kib": rss,
            "gc": gc_cost,
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
    the sampling steps on either side of it (if none is within `interval`, it stays; 0:
    edges never move).
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
    """Delivery latencies; `subscribers`: deliveries that make an update complete."""
    samples = sorted(s for answer in answers for s in answer["samples"])
    updates: dict[str, list[float]] = {}
    for answer in answers:
        for key, (count, slowest) in answer["updates"].items():
            merged = updates.setdefault(key, [0, 0.0])
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


def record_profile(server: Server, path: Path, seconds: float, us_per_msg: float) -> None:
    """A py-spy flame graph (`path`, SVG) and collapsed stacks with a summary (`.txt`)."""
    spy = shutil.which("py-spy")
    if spy is None:
        log("py-spy is not installed (pip install py-spy): no profile")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".txt")
    for fmt, out in (("flamegraph", path), ("raw", raw)):
        argv = [spy, "record", "--pid", str(server.pid), "--duration", str(max(1, round(seconds)))]
        argv += ["--rate", "400", "--nonblocking", "--format", fmt, "-o", str(out)]
        result = subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=False)
        if result.returncode != 0:
            log(f"  py-spy failed: {result.stderr.decode(errors='replace')[-300:]}")
            return
    summary_path = path.with_suffix(".top.txt")
    summary_path.write_text(profile_summary(raw.read_text(), us_per_msg))
    log(f"  profile: {path}, {raw}, {summary_path}")


def profile_summary(collapsed: str, us_per_msg: float, top: int = 45) -> str:
    """Self and inclusive time per function from py-spy's collapsed stacks.

    py-spy leaves out idle samples (the loop waiting in epoll), so a function's share of
    the samples is its share of the busy CPU time; times the measured CPU per message, it
    is that function's cost per delivered message.
    """
    own, inclusive, total = collapsed_samples(collapsed)
    total = max(total, 1)
    lines = [f"{total} samples; {us_per_msg:.1f} µs CPU per message measured without py-spy", ""]
    for title, counts in (("self", own), ("inclusive", inclusive)):
        lines.append(f"{title:>9} %   µs/msg  function")
        for frame, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            share = count / total
            lines.append(f"{share * 100:11.1f} {share * us_per_msg:8.2f}  {frame}")
        lines.append("")
    return "\n".join(lines)


def gc_cell(gc: dict[str, float]) -> str:
    if not gc:
        return "-"
    return (
        f"{gc['us_per_msg']:.1f} ({gc['full_us_per_msg']:.1f} in {gc['full']:.0f} full, "
        f"longest {gc['full_max_ms']:.0f} ms)"
    )


def report(results: list[dict[str, Any]], command: str) -> str:
    by_key = {(r["kind"], r["transport"], r["n"], r["tasks"]): r for r in results}
    cpu_rows = []
    lat_rows = []
    order = sorted(by_key.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][1]))
    for (kind, transport, n, tasks), r in order:
        if kind != "relay":
            continue
        label = scenario(transport, n, tasks)
        rows = [("relay", r)]
        rows += [(k, by_key.get((k, transport, n, tasks))) for k in ("minimal", "raw", "nchan")]
        present = {k: row for k, row in rows if row is not None}
        relay_us = [w["us_per_msg"] for w in r["windows"]]
        verdicts = []
        for other in ("minimal", "raw", "nchan"):
            base = present.get(other)
            if base is None:
                continue
            base_us = [w["us_per_msg"] for w in base["windows"]]
            ratio = median(relay_us) / median(base_us)
            windows = [a / b for a, b in zip(relay_us, base_us, strict=False)]
            text = f"{ratio:.2f}x {other} (windows {summary(windows, 2)})"
            if tasks > 1:  # the relay also polls, the others do not: no target
                text += ", polling included"
            elif other == BASELINE[transport]:
                target = TARGET_RATIO[transport]
                text = f"**{text}** {'met' if ratio <= target else 'missed'} (≤ {target:g}x)"
            verdicts.append(text)
        for row_kind, row in rows:
            if row is None:
                continue
            ws = row["windows"]
            calls = row["upstream_calls_per_s"] if row_kind == "relay" else None
            cpu_rows.append(
                [
                    label,
                    f"{LABELS[row_kind]} ({row['interval']:g} s)",
                    summary((w["us_per_msg"] for w in ws), 1),
                    summary((w["rate"] for w in ws), 0),
                    summary((w["cpu_share"] * 100 for w in ws), 0),
                    "-" if calls is None else f"{calls:,.0f}",
                    f"{median(w['client_us'] for w in ws):.1f}",
                    f"{row['rss_kib'] / 1024:.0f}",
                    gc_cell(row["gc"]),
                    "; ".join(verdicts) if row_kind == "relay" else "",
                ]
            )
            lat = row["latency"]
            verdict = ""
            if row_kind == "relay" and tasks == 1 and n == TARGET_P99_AT:
                verdict = "met" if lat["p99"] <= TARGET_P99_MS else "missed"
                verdict += f" (≤ {TARGET_P99_MS:g} ms)"
            lat_rows.append(
                [
                    label,
                    LABELS[row_kind],
                    f"{lat['p50']:.1f}",
                    f"{lat['p99']:.1f}" + (f" {verdict}" if verdict else ""),
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
            "relay's upstream calls / s",
            "client µs / msg",
            "RSS MiB",
            "GC µs / msg (full collections: count, longest)",
            "relay / others (target in bold)",
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
    many = sorted({r["tasks"] for r in results if r["tasks"] > 1})
    if many:
        cpu_table += (
            "\n\nWith many tasks the relay's CPU time includes polling the upstream once per "
            "task per interval (the upstream calls / s column, counted by the fixed upstream "
            "over the measured windows); the minimal server polls nothing. "
            "bench.economy's many-tasks table gives the relay's CPU per upstream call."
        )
    if any(r["kind"] == "nchan" for r in results):
        cpu_table += (
            "\n\nnginx + nchan: one worker, fed by a publisher process (bench/nchan.py); its "
            "CPU time is the master's and the worker's, the publisher's is not counted."
        )
    what = "one hot task" if not many else ", ".join(f"{t:,} tasks" for t in many)
    if many and any(r["tasks"] == 1 for r in results):
        what = "one hot task; " + what
    out = emit(f"Fan-out cost ({what})", command, cpu_table)
    out += emit("Delivery latency (same runs)", command, lat_table)
    return out


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that every `finally` stops its servers and clients."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="subscriber counts")
    parser.add_argument("--transports", default="sse,ws")
    parser.add_argument("--servers", default="relay,minimal,raw", help="relay, minimal, raw")
    parser.add_argument(
        "--nchan",
        choices=["auto", "on", "off"],
        default="auto",
        help="add nginx + nchan (bench/nchan.py) as a row; auto: where it is installed",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=1,
        help="spread each size's subscribers over this many tasks (default 1: one hot task)",
    )
    parser.add_argument(
        "--task-interval",
        type=float,
        default=5.0,
        help="with --tasks > 1: seconds between polls (relay) and pushes (minimal) per task",
    )
    parser.add_argument("--reps", type=int, default=3, help="measured windows per run")
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds per window (default 4, or one task interval with --tasks > 1)",
    )
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy flame graphs here")
    parser.add_argument(
        "--gc", action="store_true", help="count garbage collections (bench/gcwrap.py)"
    )
    parser.add_argument(
        "--relay-gc-freeze", type=float, default=0, help="S: an experiment, gc.freeze() after S s"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 subscribers, 2 windows of 3 s (with --tasks: of one task interval)",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = "1000", 2
        args.window = 3.0 if args.tasks == 1 else args.task_interval
    sizes = [int(s) for s in args.sizes.split(",") if s]
    transports = [t for t in args.transports.split(",") if t]
    if max(sizes) > 15_000:
        parser.error("at most 15,000 subscribers: a process holds at most 20,000 sockets")
    if args.tasks < 1 or any(n < args.tasks or n % args.tasks for n in sizes):
        parser.error("--tasks must be at least 1 and divide every size")
    if args.task_interval <= 0:
        parser.error("--task-interval must be positive")
    if args.window is None:
        args.window = 4.0 if args.tasks == 1 else args.task_interval
    relay_gc = []
    if args.relay_gc_freeze:
        relay_gc += ["--freeze-after", str(args.relay_gc_freeze)]
    args.gc = args.gc or bool(relay_gc)
    kinds = [k for k in args.servers.split(",") if k]
    if args.nchan == "on" or (args.nchan == "auto" and nchan_available()):
        kinds.append("nchan")
    upstream = start_fixed_upstream()
    results = []
    try:
        for n in sizes:
            for transport in transports:
                for kind in kinds:
                    if kind == "raw" and transport != "sse":
                        continue
                    if kind == "nchan" and args.tasks > 1:
                        continue
                    results.append(
                        run_one(
                            kind,
                            transport,
                            n,
                            upstream,
                            tasks=args.tasks,
                            task_interval=args.task_interval,
                            reps=args.reps,
                            window=args.window,
                            warmup=args.warmup,
                            profile=args.profile,
                            gc=args.gc,
                            relay_gc=relay_gc,
                        )
                    )
    finally:
        upstream.stop()
    report(results, command_line())


if __name__ == "__main__":
    main()
