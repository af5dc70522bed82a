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

Part `idle`: T tasks that never change, one SSE subscriber per task on each relay: a relay
alone, then two cluster nodes (`relay serve --redis`, two processes, so every task is
watched on both): relay CPU (all nodes) and Redis commands per watched task per second,
what a cluster pays for polling bookkeeping (leases, interest, followers' looks) when
nothing changes. Also the memory one task's stored state and history take in Redis.

Part `spread`: 60 hot tasks watched on all of three nodes, subscribed node after node (so
the first node takes every lease): the leases each node holds ten lease periods after the
last subscription was served, and when the spread first had every node at 10-30.

`--trees before=PATH,after=PATH` measures several checkouts in one run: each run's relay
is `PATH/.venv/bin/python -m relay serve` started in PATH, runs alternate between the
trees, and every row names its tree. The harness itself (load clients, upstream, Redis)
is this checkout's.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
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
LEASE_TTL = 3.0  # the relay's default (RELAY_LEASE_TTL)
SPREAD_TASKS, SPREAD_NODES, SPREAD_LOW, SPREAD_HIGH = 60, 3, 10, 30
SPREAD_AFTER = 15.0  # seconds sampled past the deadline


@dataclass(frozen=True)
class RelayTree:
    """A checkout under test: a label for its rows, its root, and the python that runs it."""

    label: str
    root: Path
    python: str


def parse_trees(text: str) -> list[RelayTree]:
    """`label=path,...`; none: this checkout, run by this python."""
    if not text:
        return [RelayTree("", ROOT, PYTHON)]
    trees = []
    for item in text.split(","):
        label, _, path = item.partition("=")
        root = Path(path).resolve()
        venv = root / ".venv" / "bin" / "python"
        if not (root / "relay" / "__main__.py").exists():
            raise SystemExit(f"{root} is not a comfy-relay checkout")
        trees.append(RelayTree(label, root, str(venv) if venv.exists() else PYTHON))
    return trees


THIS_TREE = RelayTree("", ROOT, PYTHON)


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


def start(
    config: str,
    upstream: Server,
    interval: float,
    redis: RedisServer,
    tree: RelayTree = THIS_TREE,
) -> Tree:
    args: list[str] = []
    for arg in CONFIGS[config]:
        args += ["--redis", redis.url] if arg == "--redis" else [arg]
    server = Tree(start_relay(upstream.url, interval, *args, python=tree.python, cwd=tree.root))
    if "--workers" in args:
        deadline = time.monotonic() + 15
        while len(server.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    return server


def total_calls(upstream: Server) -> int:
    return int(http_json("GET", upstream.url + "/stats")["total"])


def task_calls(upstream: Server, tasks: list[str]) -> list[int]:
    """Upstream calls so far of each of `tasks`."""
    calls = http_json("GET", upstream.url + "/stats")["calls"]
    return [int(calls.get(task, 0)) for task in tasks]


def polling(before: list[int], after: list[int], seconds: float, interval: float) -> dict[str, int]:
    """Tasks not polled at all over the window, and tasks polled at over 1.5x the interval's
    rate (two loops on one task)."""
    counts = [b - a for a, b in zip(before, after, strict=True)]
    return {
        "unpolled": sum(1 for n in counts if n == 0),
        "doubled": sum(1 for n in counts if n > 1.5 * seconds / interval + 1),
    }


def log_lines(*servers: Server) -> list[str]:
    """What the relays logged (at `--log-level warning`: warnings and errors only)."""
    lines: list[str] = []
    for server in servers:
        with contextlib.suppress(OSError):
            text = server.log_path.read_text(errors="replace")
            lines += [line for line in text.splitlines() if line.strip()]
    return lines


def report_log(what: str, lines: list[str]) -> None:
    if lines:
        log(f"warning: {what}: the relay logged {len(lines)} lines, first: {lines[:3]}")


def per(delta: dict[str, float], count: float) -> dict[str, float]:
    return {k: v / max(count, 1) for k, v in delta.items()}


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def calls_run(
    config: str,
    upstream: Server,
    redis: RedisServer,
    tasks: int,
    window: float,
    tree: RelayTree = THIS_TREE,
    profile: Path | None = None,
    settle: float = 0.0,
) -> dict[str, Any]:
    """Part `calls`: T hot tasks x 1 subscriber, one poll a second each. `profile`: a py-spy
    profile of one more window, after the measured one (a single process only). `settle`:
    seconds more before the window (a cluster's leases hand over after ten lease periods)."""
    redis.client.flushall()
    relay = start(config, upstream, 1.0, redis, tree)
    # Short: the load client gets the IDs on its command line (at most 128 KiB an argument).
    prefix = f"hot{time.monotonic_ns() % 10**10}"
    ids = [f"{prefix}-{i}" for i in range(tasks)]
    try:
        group = LoadGroup(relay.url, "sse", [(task, 1) for task in ids])
    except BaseException:
        relay.stop()
        raise
    try:
        ready = group.wait_ready()
        time.sleep(3.0 + settle)
        per_task0 = task_calls(upstream, ids)
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
        per_task1 = task_calls(upstream, ids)
        clients = group.stats()
        calls = calls1 - calls0
        wall = t1 - t0
        result: dict[str, Any] = {
            "config": config,
            "tree": tree.label,
            "ready": ready,
            "closed": clients.get("closed", 0),
            "calls_per_s": calls / wall,
            "cpu_share": (cpu1 - cpu0) / wall,
            "ms_per_call": (cpu1 - cpu0) / max(calls, 1) * 1000,
            "redis": per(diff(r1, r0), calls),
            "redis_cpu_us": (rcpu1 - rcpu0) / max(calls, 1) * 1e6,
            **polling(per_task0, per_task1, wall, 1.0),
        }
        if "Redis" in config or "workers" in config:
            result["memory"] = task_memory(redis, ids[0])
        if profile is not None and "workers" not in config:
            name = f"calls-{''.join(c for c in config if c.isalnum())}-{tree.label}.svg"
            fanout.record_profile(relay.server, profile / name, window, result["ms_per_call"] * 1e3)
        log(
            f"calls {config} {tree.label}: {result['calls_per_s']:.0f} calls/s, "
            f"{result['ms_per_call']:.2f} ms CPU/call, {result['cpu_share'] * 100:.0f}% CPU, "
            f"{result['redis'].get('commands', 0):.1f} Redis commands/change, "
            f"{ready} ready, {result['unpolled']} unpolled, {result['doubled']} doubled"
        )
        return result
    finally:
        group.stop()
        relay.stop()
        lines = log_lines(relay.server)
        report_log(f"calls {config} {tree.label}", lines)
        if "result" in locals():
            result["log_lines"] = len(lines)


def start_nodes(
    count: int, upstream: Server, redis: RedisServer | None, tree: RelayTree
) -> list[Server]:
    """`count` relays (`relay serve`, cluster nodes when `redis` is given), one process each."""
    args = ["--redis", redis.url] if redis is not None else []
    nodes: list[Server] = []
    try:
        for _ in range(count):
            nodes.append(start_relay(upstream.url, 1.0, *args, python=tree.python, cwd=tree.root))
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def idle_run(
    config: str,
    upstream: Server,
    redis: RedisServer,
    tasks: int,
    window: float,
    tree: RelayTree = THIS_TREE,
    profile: Path | None = None,
    settle: float = 0.0,
) -> dict[str, Any]:
    """Part `idle`: T idle tasks, one subscriber per task on each relay: a relay alone, or
    two cluster nodes (every task watched on both). `profile`: py-spy on the first node for
    one more window (its `.top.txt` in µs per watched task per second of all nodes)."""
    redis.client.flushall()
    two = config == "2 nodes"
    nodes = start_nodes(2 if two else 1, upstream, redis if two else None, tree)
    prefix = f"idle-{''.join(c for c in tree.label if c.isalnum())}-{time.monotonic_ns()}"
    ids = [f"{prefix}-{i}" for i in range(tasks)]
    groups: list[LoadGroup] = []
    try:
        for node in nodes:
            groups.append(LoadGroup(node.url, "sse", [(task, 1) for task in ids]))
        ready = sum(group.wait_ready() for group in groups)
        time.sleep(4.0 + settle)
        calls0 = task_calls(upstream, ids)
        r0, c0, cpu0, t0 = (
            redis.counters(),
            redis.cpu(),
            sum(node.cpu() for node in nodes),
            time.monotonic(),
        )
        time.sleep(window)
        r1, c1, cpu1, t1 = (
            redis.counters(),
            redis.cpu(),
            sum(node.cpu() for node in nodes),
            time.monotonic(),
        )
        calls1 = task_calls(upstream, ids)
        task_seconds = tasks * (t1 - t0)
        result: dict[str, Any] = {
            "config": config,
            "tree": tree.label,
            "tasks": tasks,
            "ready": ready,
            "closed": sum(group.stats().get("closed", 0) for group in groups),
            "relay_cpu_us": (cpu1 - cpu0) / task_seconds * 1e6,
            "per_task_s": per(diff(r1, r0), task_seconds),
            "redis_cpu_us": (c1 - c0) / task_seconds * 1e6,
            "upstream_per_task_s": (sum(calls1) - sum(calls0)) / task_seconds,
            "idle_task_bytes": task_memory(redis, ids[0]) if two else 0,
            **polling(calls0, calls1, t1 - t0, 1.0),
        }
        log(
            f"idle {config} {tree.label}: {result['relay_cpu_us']:.0f} µs relay CPU and "
            f"{result['per_task_s'].get('commands', 0):.2f} Redis commands per watched task "
            f"per s, {ready} ready, {result['unpolled']} unpolled, {result['doubled']} doubled"
        )
        if profile is not None:
            name = f"idle-{''.join(c for c in config if c.isalnum())}-{tree.label}.svg"
            fanout.record_profile(nodes[0], profile / name, window, result["relay_cpu_us"])
        return result
    finally:
        for group in groups:
            group.stop()
        for node in nodes:
            node.stop()
        lines = log_lines(*nodes)
        report_log(f"idle {config} {tree.label}", lines)
        if "result" in locals():
            result["log_lines"] = len(lines)


def leases_held(node: Server) -> int:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("relay_leases_held "):
                return int(float(line.split()[1]))
    raise RuntimeError("relay_leases_held is not in /metrics")


def spread_run(upstream: Server, redis: RedisServer, tree: RelayTree = THIS_TREE) -> dict[str, Any]:
    """Part `spread`: 60 hot tasks watched on all of 3 nodes, subscribed node after node;
    the leases each node holds ten lease periods after the last subscription was served."""
    redis.client.flushall()
    nodes = start_nodes(SPREAD_NODES, upstream, redis, tree)
    prefix = f"spread-{''.join(c for c in tree.label if c.isalnum())}-{time.monotonic_ns()}"
    ids = [f"{prefix}-{i}" for i in range(SPREAD_TASKS)]
    groups: list[LoadGroup] = []
    try:
        first = time.monotonic()
        for node in nodes:
            group = LoadGroup(node.url, "sse", [(task, 1) for task in ids])
            groups.append(group)
            group.wait_ready()
        last = time.monotonic()
        deadline = last + 10 * LEASE_TTL
        settled_at: float | None = None
        samples: list[list[int]] = []
        held_then: list[int] = []
        # Sampled past the deadline too, to tell a spread that comes late from one that
        # never comes.
        while time.monotonic() < deadline + SPREAD_AFTER:
            held = [leases_held(node) for node in nodes]
            samples.append(held)
            if settled_at is None and settles(held):
                settled_at = time.monotonic() - last
            if not held_then and time.monotonic() >= deadline:
                held_then = held
            time.sleep(0.5)
        held = [leases_held(node) for node in nodes]
        calls0 = task_calls(upstream, ids)
        time.sleep(5.0)
        calls1 = task_calls(upstream, ids)
        result: dict[str, Any] = {
            "tree": tree.label,
            "held": held_then,
            "held_late": held,
            "met": settles(held_then),
            "settled_at": settled_at,
            "span": last - first,
            "rendezvous": rendezvous_counts(redis, ids),
            "most_loops": max(sum(sample) for sample in samples),
            **polling(calls0, calls1, 5.0, 1.0),
        }
        log(
            f"spread {tree.label}: {held_then} after {10 * LEASE_TTL:.0f} s, {held} after "
            f"{10 * LEASE_TTL + SPREAD_AFTER:.0f} s (rendezvous: {result['rendezvous']}), first "
            f"settled at {settled_at if settled_at is None else round(settled_at, 1)} s, "
            f"subscriptions took {last - first:.1f} s, "
            f"{result['unpolled']} unpolled, {result['doubled']} doubled"
        )
        return result
    finally:
        for group in groups:
            group.stop()
        for node in nodes:
            node.stop()
        lines = log_lines(*nodes)
        report_log(f"spread {tree.label}", lines)
        if "result" in locals():
            result["log_lines"] = len(lines)


def rendezvous_counts(redis: RedisServer, tasks: list[str]) -> list[int]:
    """How many of `tasks` each registered node is the rendezvous choice for
    (relay/cluster/placement.py's weight, the same in both trees), most first."""
    registered = redis.client.zrange("relay:nodes", 0, -1)
    nodes = [n.decode() if isinstance(n, bytes) else str(n) for n in registered]

    def weight(node: str, task: str) -> int:
        digest = hashlib.blake2b(f"{node}\x00{task}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    choices = [max(nodes, key=lambda node: weight(node, task)) for task in tasks] if nodes else []
    return sorted((choices.count(node) for node in nodes), reverse=True)


def settles(held: list[int]) -> bool:
    """Every node polls 10-30 of the tasks, and no task has two loops. (A task between two
    holders, released and not yet taken, is in no node's count for a moment.)"""
    return sum(held) <= SPREAD_TASKS and all(SPREAD_LOW <= h <= SPREAD_HIGH for h in held)


def task_memory(redis: RedisServer, task_id: str) -> int:
    """Memory of one task's keys in Redis, either key layout (before and after 081d789)."""
    keys = [f"relay:task:{task_id}", f"relay:history:{task_id}", f"relay:lease:{task_id}"]
    keys += [f"relay:{{{task_id}}}:{name}" for name in ("state", "lease", "interest")]
    keys += [f"relay:interest:{task_id}"]
    return sum(redis.client.memory_usage(key) or 0 for key in keys)


def fanout_run(
    config: str,
    upstream: Server,
    redis: RedisServer,
    transport: str,
    n: int,
    reps: int,
    window: float,
    tree: RelayTree = THIS_TREE,
) -> dict[str, Any]:
    """Part `fanout`: bench/fanout.py's run, the relay started as `config`."""
    redis.client.flushall()

    def relay_as_config(upstream_url: str, interval: float, *more: str, **_: Any) -> Tree:
        return start(config, upstream, interval, redis, tree)

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
    result["tree"] = tree.label
    return result


def command_cells(per_call: dict[str, float], top: int = 6) -> str:
    names = sorted(
        (k for k in per_call if k not in ("bytes_in", "bytes_out", "commands")),
        key=lambda k: -per_call[k],
    )
    return ", ".join(f"{k} {per_call[k]:.2f}" for k in names[:top] if per_call[k] >= 0.01)


def median_commands(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each counter's median over runs (0 in a run that did not have it)."""
    names = {name for run in runs for name in run}
    return {name: median(run.get(name, 0.0) for run in runs) for name in names}


def ratios(results: list[dict[str, Any]], key: str, run: dict[str, Any], base: str) -> float | None:
    """`run[key]` over the same tree's and repetition's `base` config."""
    for other in results:
        if (other["config"], other["tree"], other["rep"]) == (base, run["tree"], run["rep"]):
            return float(run[key]) / max(float(other[key]), 1e-12)
    return None


def health(runs: list[dict[str, Any]]) -> str:
    """Tasks unpolled / polled twice over (worst run), and relay log lines (all runs)."""
    unpolled = max(r.get("unpolled", 0) for r in runs)
    doubled = max(r.get("doubled", 0) for r in runs)
    return f"{unpolled} / {doubled} / {sum(r.get('log_lines', 0) for r in runs)}"


def groups(results: list[dict[str, Any]], configs: list[str], trees: list[RelayTree]) -> Any:
    for config in configs:
        for tree in trees:
            runs = [r for r in results if r["config"] == config and r["tree"] == tree.label]
            if runs:
                yield config, tree, runs


def report_calls(
    results: list[dict[str, Any]], command: str, tasks: int, trees: list[RelayTree]
) -> None:
    rows = []
    for config, tree, runs in groups(results, list(CONFIGS), trees):
        redis_runs = [r["redis"] for r in runs if r["redis"].get("commands")]
        commands = median_commands(redis_runs) if redis_runs else {}
        vs_alone = [x for r in runs if (x := ratios(results, "ms_per_call", r, "1 worker"))]
        memory = [r["memory"] for r in runs if r.get("memory")]
        rows.append(
            [
                config,
                tree.label,
                summary((r["calls_per_s"] for r in runs), 0),
                summary((r["cpu_share"] * 100 for r in runs), 0),
                summary((r["ms_per_call"] for r in runs), 3),
                summary(vs_alone, 2) + "x" if config != "1 worker" else "1",
                summary((r["commands"] for r in redis_runs), 2) if redis_runs else "-",
                f"{commands.get('bytes_in', 0):,.0f} / {commands.get('bytes_out', 0):,.0f}"
                if redis_runs
                else "-",
                summary((r["redis_cpu_us"] for r in runs), 0) if redis_runs else "-",
                command_cells(commands, top=10) if redis_runs else "",
                health(runs),
                f"{median(memory):,.0f} B" if memory else "-",
            ]
        )
    body = table(
        [
            "relay",
            "tree",
            "upstream calls / s sustained",
            "relay CPU % (all processes)",
            "relay CPU ms / call",
            "vs 1 worker (same tree, same round)",
            "Redis commands / change",
            "bytes to / from Redis / change",
            "Redis CPU µs / change",
            "commands / change, by name (median of runs)",
            "tasks unpolled / polled twice / relay log lines",
            "Redis memory of a hot task",
        ],
        rows,
    )
    body += (
        f"\n\n{tasks:,} hot tasks, one SSE subscriber each, polled every second (so "
        f"{tasks:,} calls/s offered); every call is a change. Median (min-max) of the "
        "alternating runs; ratios are taken within a round and a tree."
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


def report_idle(results: list[dict[str, Any]], command: str, trees: list[RelayTree]) -> None:
    rows = []
    for config, tree, runs in groups(results, ["alone", "2 nodes"], trees):
        commands = median_commands([r["per_task_s"] for r in runs])
        vs_alone = [x for r in runs if (x := ratios(results, "relay_cpu_us", r, "alone"))]
        two = config == "2 nodes"
        rows.append(
            [
                "relay alone" if not two else "two cluster nodes",
                tree.label,
                summary((r["relay_cpu_us"] for r in runs), 0),
                summary(vs_alone, 2) + "x" if two else "1",
                summary((r["per_task_s"].get("commands", 0) for r in runs), 2) if two else "-",
                command_cells(commands, top=8) if two else "",
                summary((r["redis_cpu_us"] for r in runs), 1) if two else "-",
                f"{commands.get('bytes_in', 0):,.0f} / {commands.get('bytes_out', 0):,.0f}"
                if two
                else "-",
                summary((r["upstream_per_task_s"] for r in runs), 2),
                health(runs),
                f"{median(r['idle_task_bytes'] for r in runs):,.0f} B" if two else "-",
            ]
        )
    tasks = results[0]["tasks"] if results else 0
    body = table(
        [
            "relay",
            "tree",
            "relay CPU µs / watched task / s (all nodes)",
            "vs alone (same tree, same round)",
            "Redis commands / watched task / s",
            "by command",
            "Redis CPU µs / watched task / s",
            "bytes to / from Redis / watched task / s",
            "upstream calls / task / s",
            "tasks unpolled / polled twice / relay log lines",
            "Redis memory of an idle task",
        ],
        rows,
    )
    body += (
        f"\n\n{tasks:,} tasks that never change, one SSE subscriber per task on each relay "
        f"(two cluster nodes: two `relay serve --redis` processes, so every task is watched on "
        f"both), polled every second, default {LEASE_TTL:.0f} s lease. Median (min-max) of the "
        "alternating runs."
    )
    emit("Workers: an idle watched task on a relay alone and on two nodes", command, body)


def report_spread(results: list[dict[str, Any]], command: str, trees: list[RelayTree]) -> None:
    rows = []
    for tree in trees:
        runs = [r for r in results if r["tree"] == tree.label]
        if not runs:
            continue
        settled = [r["settled_at"] for r in runs]
        rows.append(
            [
                tree.label,
                f"{sum(r['met'] for r in runs)} of {len(runs)}",
                ", ".join(str(r["held"]) for r in runs),
                ", ".join(str(r["held_late"]) for r in runs),
                ", ".join(str(r["rendezvous"]) for r in runs),
                ", ".join("never" if t is None else f"{t:.1f}" for t in settled),
                summary((r["span"] for r in runs), 1),
                ", ".join(str(r["most_loops"]) for r in runs),
                health(runs),
            ]
        )
    body = table(
        [
            "tree",
            f"runs with every node at {SPREAD_LOW}-{SPREAD_HIGH}",
            f"leases held per node {10 * LEASE_TTL:.0f} s after the last subscription",
            f"... and {10 * LEASE_TTL + SPREAD_AFTER:.0f} s after",
            "rendezvous choices per node (sorted)",
            "first at 10-30 each, s after the last subscription",
            "s from the first subscription to the last one served",
            "most leases held at once (all nodes)",
            "tasks unpolled / polled twice (5 s after) / relay log lines",
        ],
        rows,
    )
    body += (
        f"\n\n{SPREAD_TASKS} hot tasks, one SSE subscriber per task on each of "
        f"{SPREAD_NODES} nodes, subscribed node after node (each node's subscribers served "
        f"before the next node's start), polled every second, default {LEASE_TTL:.0f} s lease."
    )
    emit("Workers: polling spread over three nodes", command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="calls,fanout,idle,spread")
    parser.add_argument("--tasks", type=int, default=1500, help="hot tasks of part calls")
    parser.add_argument("--reps", type=int, default=2, help="alternating runs of calls, idle")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--subscribers", type=int, default=10_000, help="part fanout")
    parser.add_argument("--transports", default="sse,ws", help="part fanout")
    parser.add_argument("--idle-tasks", type=int, default=1000, help="part idle")
    parser.add_argument("--spread-reps", type=int, default=3, help="runs of part spread")
    parser.add_argument(
        "--trees",
        default="",
        help="label=path,... checkouts whose relay to measure, alternating (default: this one)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="parts calls and idle: py-spy profiles of round 1 here (one more window each)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="parts calls and idle: seconds more before each window (steady state)",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, one rep")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.reps, args.window = 300, 1, 5.0
        args.subscribers, args.transports, args.idle_tasks = 2000, "sse", 200
        args.spread_reps = 1
    parts = set(args.parts.split(","))
    trees = parse_trees(args.trees)
    command = command_line()
    upstream = start_upstream()
    redis = RedisServer()
    try:
        if "calls" in parts:
            results = []
            for rep in range(args.reps):
                for config in CONFIGS:
                    for tree in trees:
                        profile = args.profile if rep == 0 else None
                        run = calls_run(
                            config,
                            upstream,
                            redis,
                            args.tasks,
                            args.window,
                            tree,
                            profile,
                            args.settle,
                        )
                        results.append({**run, "rep": rep})
                        time.sleep(3.0)
            report_calls(results, command, args.tasks, trees)
        if "fanout" in parts:
            runs = []
            for transport in args.transports.split(","):
                for config in ("1 worker", "2 workers"):
                    for tree in trees:
                        runs.append(
                            fanout_run(
                                config, upstream, redis, transport, args.subscribers, 3, 4.0, tree
                            )
                        )
            report_fanout(runs, command)
        if "idle" in parts:
            idle = []
            for rep in range(args.reps):
                for config in ("alone", "2 nodes"):
                    for tree in trees:
                        profile = args.profile if rep == 0 else None
                        run = idle_run(
                            config,
                            upstream,
                            redis,
                            args.idle_tasks,
                            args.window,
                            tree,
                            profile,
                            args.settle,
                        )
                        idle.append({**run, "rep": rep})
                        time.sleep(2.0)
            report_idle(idle, command, trees)
        if "spread" in parts:
            spread = []
            for _ in range(args.spread_reps):
                for tree in trees:
                    spread.append(spread_run(upstream, redis, tree))
                    time.sleep(2.0)
            report_spread(spread, command, trees)
    finally:
        redis.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
