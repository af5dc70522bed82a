"""Workers, nodes and Redis: what `relay serve --workers 2` adds on a 2-core machine, and what
the single Redis costs per change.

Side by side in one run, alternating, against bench/fixed_upstream.py (every call to a hot
task is a new state, so every upstream call is a change stored and published):

- `1 worker`: `relay serve` as it runs alone, no Redis;
- `1 worker + Redis`: the same process as a cluster node (`--redis`), to show Redis's own
  cost on the path;
- `2 workers`: `relay serve --workers 2 --redis ...`: two processes on one port, each a node.

Part `calls`: T hot tasks with one SSE subscriber each, polled every second: the upstream
calls per second sustained (the fixed upstream's count over the window), the relay's CPU
(parent and workers, from /proc) per call, and the Redis commands and bytes per call (INFO
commandstats and stats of a throwaway redis-server, before and after the window).

Part `fanout`: one hot task with 10,000 subscribers, one update a second, through
bench/fanout.py's measurement: CPU per delivered message and delivery latency (p99).

Part `idle`: T tasks that never change, four subscribers each (spread by the kernel over
the workers, so most tasks are watched on both): Redis commands per watched task per second,
what a cluster pays for polling bookkeeping (leases, interest, followers' looks) when
nothing changes. Also the memory one task's stored state and history take in Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import fanout
from .common import (
    PYTHON,
    ROOT,
    LoadGroup,
    Server,
    command_line,
    cpu_seconds,
    emit,
    free_port,
    http_json,
    log,
    median,
    rss_kib,
    start_relay,
    summary,
    table,
)

CONFIGS = {
    "1 worker": (),
    "1 worker + Redis": ("--redis",),
    "2 workers": ("--workers", "2", "--redis"),
}


class RedisServer:
    """A throwaway redis-server on a free loopback port, nothing on disk."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no"]
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def counters(self) -> dict[str, float]:
        """Commands by name, all commands, and bytes in and out, so far."""
        stats = self.client.info("stats")
        out: dict[str, float] = {
            "bytes_in": stats["total_net_input_bytes"],
            "bytes_out": stats["total_net_output_bytes"],
        }
        for name, values in self.client.info("commandstats").items():
            out[name.removeprefix("cmdstat_")] = values["calls"]
        out["commands"] = sum(v for k, v in out.items() if not k.startswith("bytes_"))
        return out

    def cpu(self) -> float:
        return cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


class Tree:
    """A relay server and its workers: CPU and memory of the whole process tree."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    def pids(self) -> list[int]:
        pid = self.server.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return [pid, *map(int, children)]
        return [pid]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())


def start_upstream() -> Server:
    """bench/fixed_upstream.py, in its cheap raw mode when it has one."""
    port = free_port()
    argv = [PYTHON, "-m", "bench.fixed_upstream", "--port", str(port)]
    if "--raw" in (ROOT / "bench" / "fixed_upstream.py").read_text():
        argv.append("--raw")
    return Server("fixed-upstream", argv, port, "/healthz")


def start(config: str, upstream: Server, interval: float, redis: RedisServer) -> Tree:
    args: list[str] = []
    for arg in CONFIGS[config]:
        args += ["--redis", redis.url] if arg == "--redis" else [arg]
    server = Tree(start_relay(upstream.url, interval, *args))
    if "--workers" in args:
        deadline = time.monotonic() + 15
        while len(server.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    return server


def total_calls(upstream: Server) -> int:
    return int(http_json("GET", upstream.url + "/stats")["total"])


def per(delta: dict[str, float], count: float) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in delta.items()}


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def calls_run(
    config: str, upstream: Server, redis: RedisServer, tasks: int, window: float
) -> dict[str, Any]:
    """Part `calls`: T hot tasks x 1 subscriber, one poll a second each."""
    redis.client.flushall()
    relay = start(config, upstream, 1.0, redis)
    prefix = f"hot-{''.join(c for c in config if c.isalnum())}-{time.monotonic_ns()}"
    group = LoadGroup(relay.url, "sse", [(f"{prefix}-{i}", 1) for i in range(tasks)])
    try:
        ready = group.wait_ready()
        time.sleep(3.0)
        calls0, cpu0, r0, rcpu0, t0 = (
            total_calls(upstream),
            relay.cpu(),
            redis.counters(),
            redis.cpu(),
            time.monotonic(),
        )
        time.sleep(window)
        calls1, cpu1, r1, rcpu1, t1 = (
            total_calls(upstream),
            relay.cpu(),
            redis.counters(),
            redis.cpu(),
            time.monotonic(),
        )
        calls = calls1 - calls0
        wall = t1 - t0
        result: dict[str, Any] = {
            "config": config,
            "ready": ready,
            "calls_per_s": calls / wall,
            "cpu_share": (cpu1 - cpu0) / wall,
            "ms_per_call": (cpu1 - cpu0) / max(calls, 1) * 1000,
            "redis": per(diff(r1, r0), calls),
            "redis_cpu_us": (rcpu1 - rcpu0) / max(calls, 1) * 1e6,
        }
        log(
            f"calls {config}: {result['calls_per_s']:.0f} calls/s, "
            f"{result['ms_per_call']:.2f} ms CPU/call, {result['cpu_share'] * 100:.0f}% CPU"
        )
        return result
    finally:
        group.stop()
        relay.stop()


def idle_run(upstream: Server, redis: RedisServer, tasks: int, window: float) -> dict[str, Any]:
    """Part `idle`: T idle tasks x 4 subscribers on 2 workers: Redis per watched task."""
    redis.client.flushall()
    relay = start("2 workers", upstream, 1.0, redis)
    prefix = f"idle-{time.monotonic_ns()}"
    group = LoadGroup(relay.url, "sse", [(f"{prefix}-{i}", 4) for i in range(tasks)])
    try:
        group.wait_ready()
        time.sleep(4.0)
        r0, c0, t0 = redis.counters(), redis.cpu(), time.monotonic()
        time.sleep(window)
        r1, c1, t1 = redis.counters(), redis.cpu(), time.monotonic()
        keys = [f"relay:task:{prefix}-0", f"relay:history:{prefix}-0"]
        memory = sum(redis.client.memory_usage(key) or 0 for key in keys)
        return {
            "tasks": tasks,
            "per_task_s": per(diff(r1, r0), tasks * (t1 - t0)),
            "redis_cpu_us": (c1 - c0) / (tasks * (t1 - t0)) * 1e6,
            "idle_task_bytes": memory,
        }
    finally:
        group.stop()
        relay.stop()


def history_bytes(redis: RedisServer) -> tuple[int, int, int]:
    """One hot task of the last calls run: memory of its stored state, of its history, and
    how many states that history holds."""
    for key in redis.client.scan_iter("relay:history:*", count=1000):
        task = key.decode().removeprefix("relay:history:")
        state = redis.client.memory_usage(f"relay:task:{task}") or 0
        return state, redis.client.memory_usage(key) or 0, int(redis.client.llen(key))
    return 0, 0, 0


def fanout_run(
    config: str,
    upstream: Server,
    redis: RedisServer,
    transport: str,
    n: int,
    reps: int,
    window: float,
) -> dict[str, Any]:
    """Part `fanout`: bench/fanout.py's run, the relay started as `config`."""
    redis.client.flushall()

    def relay_as_config(upstream_url: str, interval: float, *more: str, **_: Any) -> Tree:
        return start(config, upstream, interval, redis)

    original = fanout.start_relay  # type: ignore[attr-defined]
    fanout.start_relay = relay_as_config  # type: ignore[attr-defined,assignment]
    try:
        result = fanout.run_one(
            "relay",
            transport,
            n,
            upstream,
            reps=reps,
            window=window,
            warmup=1.5,
            profile=None,
            gc=False,
            relay_gc=[],
        )
    finally:
        fanout.start_relay = original  # type: ignore[attr-defined]
    result["config"] = config
    return result


def command_cells(per_call: dict[str, float], top: int = 6) -> str:
    names = sorted(
        (k for k in per_call if k not in ("bytes_in", "bytes_out", "commands")),
        key=lambda k: -per_call[k],
    )
    return ", ".join(f"{k} {per_call[k]:.2f}" for k in names[:top] if per_call[k] >= 0.01)


def report_calls(results: list[dict[str, Any]], command: str, tasks: int) -> None:
    rows = []
    for config in CONFIGS:
        runs = [r for r in results if r["config"] == config]
        if not runs:
            continue
        redis_runs = [r["redis"] for r in runs if r["redis"].get("commands")]
        rows.append(
            [
                config,
                summary((r["calls_per_s"] for r in runs), 0),
                summary((r["cpu_share"] * 100 for r in runs), 0),
                summary((r["ms_per_call"] for r in runs), 2),
                summary((r["commands"] for r in redis_runs), 1) if redis_runs else "-",
                summary((r.get("bytes_in", 0) for r in redis_runs), 0) if redis_runs else "-",
                summary((r.get("bytes_out", 0) for r in redis_runs), 0) if redis_runs else "-",
                f"{median(r['redis_cpu_us'] for r in runs):.0f}"
                if "Redis" in config or "workers" in config
                else "-",
                command_cells(redis_runs[0]) if redis_runs else "",
            ]
        )
    body = table(
        [
            "relay",
            "upstream calls / s sustained",
            "relay CPU % (all processes)",
            "relay CPU ms / call",
            "Redis commands / change",
            "bytes to Redis / change",
            "bytes from Redis / change",
            "Redis CPU µs / change",
            "commands / change, by name (first run)",
        ],
        rows,
    )
    body += (
        f"\n\n{tasks:,} hot tasks, one SSE subscriber each, polled every second (so "
        f"{tasks:,} calls/s offered); every call is a change. Median (min-max) of the "
        "alternating runs."
    )
    emit("Workers: upstream calls sustained", command, body)


def report_fanout(results: list[dict[str, Any]], command: str) -> None:
    rows = []
    for r in results:
        ws = r["windows"]
        lat = r["latency"]
        rows.append(
            [
                fanout.scenario(r["transport"], r["n"], 1),
                r["config"],
                summary((w["us_per_msg"] for w in ws), 1),
                summary((w["rate"] for w in ws), 0),
                summary((w["cpu_share"] * 100 for w in ws), 0),
                f"{lat['p50']:.0f}",
                f"**{lat['p99']:.0f}**",
                f"{lat['max']:.0f}",
                f"{lat['updates']} / {lat['samples']:,}",
            ]
        )
    body = table(
        [
            "subscribers",
            "relay",
            "CPU µs / message (all processes)",
            "messages / s",
            "relay CPU %",
            "p50 ms",
            "p99 ms",
            "max ms",
            "updates / deliveries",
        ],
        rows,
    )
    emit("Workers: fan-out to 10,000 subscribers of one task", command, body)


def report_idle(idle: dict[str, Any], hot: tuple[int, int, int], command: str) -> None:
    state, history, length = hot
    per_entry = history / max(length, 1)
    per_task = idle["per_task_s"]
    rows = [
        [
            "commands / watched task / s",
            f"{per_task.get('commands', 0):.2f}",
            command_cells(per_task),
        ],
        ["bytes to Redis / watched task / s", f"{per_task.get('bytes_in', 0):.0f}", ""],
        ["Redis CPU µs / watched task / s", f"{idle['redis_cpu_us']:.0f}", ""],
        ["bytes from Redis / watched task / s", f"{per_task.get('bytes_out', 0):.0f}", ""],
        ["memory of an idle task (state, history of 1)", f"{idle['idle_task_bytes']:,} B", ""],
        [
            "memory of a hot task: state + history of 64",
            f"{state + per_entry * 64:,.0f} B",
            f"state {state:,} B, history {history:,} B for {length} states",
        ],
    ]
    body = table(["Redis, per task", "value", "by command"], rows)
    body += (
        f"\n\n{idle['tasks']:,} tasks that never change, four SSE subscribers each, on "
        "2 workers (default lease, 3 s: checks every second): the bookkeeping of leases, "
        "interest and followers, without changes."
    )
    emit("Workers: what Redis costs per watched task", command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="calls,fanout,idle")
    parser.add_argument("--tasks", type=int, default=1500, help="hot tasks of part calls")
    parser.add_argument("--reps", type=int, default=2, help="alternating runs of part calls")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--subscribers", type=int, default=10_000, help="part fanout")
    parser.add_argument("--transports", default="sse,ws", help="part fanout")
    parser.add_argument("--idle-tasks", type=int, default=1000, help="part idle")
    parser.add_argument("--quick", action="store_true", help="small counts, one rep")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.reps, args.window = 300, 1, 5.0
        args.subscribers, args.transports, args.idle_tasks = 2000, "sse", 200
    parts = set(args.parts.split(","))
    command = command_line()
    upstream = start_upstream()
    redis = RedisServer()
    try:
        if "calls" in parts:
            results = []
            for _ in range(args.reps):
                for config in CONFIGS:
                    results.append(calls_run(config, upstream, redis, args.tasks, args.window))
                    time.sleep(3.0)
            hot = history_bytes(redis)
            report_calls(results, command, args.tasks)
        else:
            hot = (0, 0, 0)
        if "fanout" in parts:
            runs = []
            for transport in args.transports.split(","):
                for config in ("1 worker", "2 workers"):
                    runs.append(
                        fanout_run(config, upstream, redis, transport, args.subscribers, 3, 4.0)
                    )
            report_fanout(runs, command)
        if "idle" in parts:
            report_idle(idle_run(upstream, redis, args.idle_tasks, args.window), hot, command)
    finally:
        redis.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
