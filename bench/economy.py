"""Upstream economy: upstream calls per task-minute, relay against every browser polling.

The relay polls the simulator (`relay simulate --fail-rate 0`) every second. Part one: one
task each watched by 1, 10, 100 and 1,000 SSE subscribers (and one by 500 SSE + 500
WebSocket subscribers), all at once, measured over a window of `--window` seconds after
every subscriber is connected, scaled to a minute. Part two: many tasks with one
subscriber each. Calls are the simulator's own per-task counts (`GET /sim/stats`).

The naive alternative, every browser polling the upstream through a thin proxy at the same
interval, costs subscribers x 60 / interval calls per task-minute; it is computed, not run
(1,000 browsers polling once a second is 1,000 calls/s for one task).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

from .common import (
    LoadGroup,
    command_line,
    emit,
    http_json,
    log,
    start_relay,
    start_simulator,
    summary,
    table,
)

INTERVAL = 1.0
SAMPLE_EVERY = 0.05
TARGET = 1.05


def create_tasks(sim_url: str, count: int, duration: float) -> list[str]:
    body = {"queue": 0, "duration": duration, "fail": False}
    return [http_json("POST", sim_url + "/sim/tasks", body)["taskId"] for _ in range(count)]


def calls_per_minute(
    sim_url: str, tasks: list[str], window: float, relay_cpu: Any, sim_cpu: Any = None
) -> tuple[dict[str, float], float, float, float]:
    """Per-task upstream calls per minute over one window; also relay CPU s and wall s.

    Counting whole calls in a 20 s window is only good to one call in 20 (5%), so the
    simulator's counts are sampled every SAMPLE_EVERY seconds and each task's rate is
    taken between its first and its last call inside the window (calls placed at the
    middle of the sampling step that saw them).
    """
    samples: list[tuple[float, dict[str, int]]] = []
    sim_cpu = sim_cpu or (lambda: 0.0)
    c0, s0, t0 = relay_cpu(), sim_cpu(), time.monotonic()
    while True:
        now = time.monotonic()
        calls = http_json("GET", sim_url + "/sim/stats")["calls"]
        samples.append(((now + time.monotonic()) / 2, calls))
        if now - t0 >= window:
            break
        time.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - now)))
    c1, s1, t1 = relay_cpu(), sim_cpu(), time.monotonic()
    rates = {}
    for task in tasks:
        counts = [(t, calls.get(task, 0)) for t, calls in samples]
        steps = [
            ((ta + tb) / 2, cb) for (ta, ca), (tb, cb) in itertools.pairwise(counts) if cb != ca
        ]
        if len(steps) >= 2 and steps[-1][0] > steps[0][0]:
            (first_t, first_n), (last_t, last_n) = steps[0], steps[-1]
            rates[task] = (last_n - first_n) * 60 / (last_t - first_t)
        else:
            rates[task] = (counts[-1][1] - counts[0][1]) * 60 / (t1 - t0)
    return rates, c1 - c0, t1 - t0, s1 - s0


def single_task(
    sim_url: str, relay: Any, groups: list[tuple[int, int]], mixed: int, window: float
) -> str:
    """Part one: (subscribers, tasks) groups, every task of a group watched by that many."""
    duration = window + 60
    tasks: dict[int, list[str]] = {}
    for subscribers, count in groups:
        tasks[subscribers] = create_tasks(sim_url, count, duration)
    mixed_tasks = create_tasks(sim_url, 1, duration) if mixed else []
    spec = [(t, s) for s, ts in tasks.items() for t in ts]
    spec += [(t, mixed - mixed // 2) for t in mixed_tasks]
    loads = [LoadGroup(relay.url, "sse", spec)]
    if mixed:
        loads.append(LoadGroup(relay.url, "ws", [(t, mixed // 2) for t in mixed_tasks]))
    try:
        started = time.monotonic()
        ready = sum(load.wait_ready() for load in loads)
        took = time.monotonic() - started
        log(f"economy: {ready} subscribers on {len(spec)} tasks in {took:.1f} s")
        time.sleep(1.0)
        everything = [t for ts in tasks.values() for t in ts] + mixed_tasks
        rates, _, wall, _ = calls_per_minute(sim_url, everything, window, relay.cpu)
    finally:
        for load in loads:
            load.stop()
    naive_per_subscriber = 60 / INTERVAL
    one = statistics.mean(rates[t] for t in tasks[min(tasks)])
    rows = []
    for subscribers, ts in sorted(tasks.items()) + ([(mixed, mixed_tasks)] if mixed else []):
        values = [rates[t] for t in ts]
        mean = statistics.mean(values)
        naive = subscribers * naive_per_subscriber
        label = f"{subscribers:,}"
        if ts is mixed_tasks:
            label += f" ({mixed - mixed // 2} SSE + {mixed // 2} WS)"
        verdict = ""
        if subscribers >= 1000:
            verdict = " " + ("met" if mean / one <= TARGET else "missed")
        rows.append(
            [
                label,
                len(ts),
                summary(values, 1),
                f"{mean:.1f}",
                f"{naive:,.0f}",
                f"1 / {naive / mean:,.0f}",
                f"**{mean / one:.3f}x**{verdict}" if subscribers > 1 else "1",
            ]
        )
    body = table(
        [
            "subscribers per task",
            "tasks",
            "relay calls / task-minute, median (min-max)",
            "mean",
            "naive: every browser polls",
            "relay / naive",
            "vs 1 subscriber (mean)",
        ],
        rows,
    )
    body += (
        f"\n\nPoll interval {INTERVAL:g} s (so 60 calls / task-minute is one poll per second), "
        f"window {wall:.1f} s after all {ready:,} subscribers were connected."
    )
    return body


def many_tasks(sim: Any, relay: Any, counts: list[int], window: float) -> str:
    """Part two: many tasks, one subscriber each."""
    rows = []
    for count in counts:
        tasks = create_tasks(sim.url, count, window + 60)
        load = LoadGroup(relay.url, "sse", [(t, 1) for t in tasks])
        try:
            started = time.monotonic()
            ready = load.wait_ready()
            log(f"economy: {ready} tasks with one subscriber in {time.monotonic() - started:.1f} s")
            time.sleep(1.0)
            rates, cpu, wall, sim_cpu = calls_per_minute(sim.url, tasks, window, relay.cpu, sim.cpu)
        finally:
            load.stop()
        total = sum(rates.values()) / 60
        rows.append(
            [
                f"{count:,}",
                summary(rates.values(), 1),
                f"{60 / INTERVAL:.0f}",
                f"{total:,.0f} of {count / INTERVAL:,.0f}",
                f"{cpu / wall * 100:.0f}",
                f"{sim_cpu / wall * 100:.0f}",
                f"{cpu / max(total * wall, 1) * 1000:.2f}",
                "1 (one subscriber each)",
            ]
        )
        time.sleep(3.0)  # the loops linger, then stop
    return table(
        [
            "tasks x 1 subscriber",
            "relay calls / task-minute, median (min-max) over tasks",
            "one poll per interval",
            "upstream calls / s",
            "relay CPU %",
            "simulator CPU %",
            "relay CPU ms / upstream call",
            "relay / naive",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=20.0, help="seconds, scaled to a minute")
    parser.add_argument("--many", default="200,1000", help="task counts for part two")
    parser.add_argument(
        "--part", choices=["one", "many", "both"], default="both", help="which part to run"
    )
    parser.add_argument("--quick", action="store_true", help="10 s windows, fewer tasks")
    args = parser.parse_args()
    # (subscribers, tasks): more tasks where they are cheap, to average out whole calls.
    groups = [(1, 5), (10, 5), (100, 3), (1000, 3)]
    mixed = 1000
    if args.quick:
        args.window, args.many = 10.0, "200"
        groups, mixed = [(1, 3), (10, 3), (100, 1), (1000, 1)], 0
    sim = start_simulator()
    relay = start_relay(sim.url, INTERVAL)
    command = command_line()
    try:
        if args.part in ("one", "both"):
            part_one = single_task(sim.url, relay, groups, mixed, args.window)
            emit("Upstream economy: one task, many subscribers", command, part_one)
        if args.part in ("many", "both"):
            time.sleep(3.0 if args.part == "both" else 0.0)
            counts = [int(c) for c in args.many.split(",") if c]
            part_two = many_tasks(sim, relay, counts, args.window)
            emit("Upstream economy: many tasks, one subscriber each", command, part_two)
    finally:
        relay.stop()
        sim.stop()


if __name__ == "__main__":
    main()
