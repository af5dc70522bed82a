"""Tasks left unpolled after one node's subscribers all leave at once (issue 18 follow-up).

    python -m bench.stranded --tree after=. --tasks 3000 --runs 3

N idle tasks are watched on node A alone, so A holds every lease; all of A's subscribers
close at once, so its loops end together (a burst of releases and interest writes, past
the node's Redis pool); then the same tasks are watched on node B. Counts the tasks that
no node polls 10-20 s and 40-50 s after B's subscribers were served (an idle task is
polled every 5 s), and for those, who holds their lease in Redis.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from .common import LoadGroup, Server, log
from .workers import (
    RedisServer,
    leases_held,
    log_lines,
    parse_trees,
    start_nodes,
    start_upstream,
    task_calls,
)

IDLE_INTERVAL = 5.0  # an idle (queued) task is polled every 5 s


def unpolled(upstream: Server, ids: list[str], seconds: float = 10.0) -> tuple[list[str], int]:
    """The tasks no node polled over `seconds`, and how many were polled at over 1.5x an idle
    task's rate (two loops on one task)."""
    before = task_calls(upstream, ids)
    time.sleep(seconds)
    after = task_calls(upstream, ids)
    counts = [b - a for a, b in zip(before, after, strict=True)]
    # One loop polls an idle task 2 times in 10 s (3 at most with the jitter), two loops 4.
    doubled = sum(1 for n in counts if n > 1.5 * seconds / IDLE_INTERVAL)
    return [task for task, n in zip(ids, counts, strict=True) if n == 0], doubled


def grouped(lines: list[str]) -> list[tuple[int, str]]:
    """Log lines counted by their text with task IDs and numbers blanked, most frequent first."""
    counts: dict[str, int] = {}
    for line in lines:
        key = re.sub(r"idle\d+-\d+", "<task>", line)
        key = re.sub(r"\d+(\.\d+)?", "N", key)
        counts[key] = counts.get(key, 0) + 1
    return sorted(((n, key) for key, n in counts.items()), reverse=True)


def holders(redis: RedisServer, tasks: list[str]) -> dict[str, int]:
    """Lease holders of `tasks` in Redis (any of the three key layouts: the owner in the
    task's hash since 0eed115), 'none' for a free lease."""
    counts: dict[str, int] = {}
    for task in tasks:
        value = (
            redis.client.hget(f"relay:{{{task}}}:state", "owner")
            or redis.client.get(f"relay:{{{task}}}:lease")
            or redis.client.get(f"relay:lease:{task}")
        )
        name = value.decode() if isinstance(value, bytes) else "none"
        counts[name] = counts.get(name, 0) + 1
    return counts


def held(node: Server) -> int | str:
    """The node's `relay_leases_held`, or why it did not say (a node too busy to answer)."""
    try:
        return leases_held(node)
    except OSError as exc:
        return f"no answer ({exc})"


def calls(stat: dict[str, Any]) -> int:
    return int(stat.get("calls", 0))


def command_counts(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    """Calls of each Redis command between two `INFO commandstats`, most first."""
    counts = {
        name.removeprefix("cmdstat_"): calls(stat) - calls(before.get(name, {}))
        for name, stat in after.items()
    }
    return dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1]))


def run(tree_spec: str, tasks: int) -> None:
    tree = parse_trees(tree_spec)[0]
    upstream = start_upstream()
    redis = RedisServer()
    nodes = start_nodes(2, upstream, redis, tree)
    ids = [f"idle{time.monotonic_ns() % 10**8}-{i}" for i in range(tasks)]
    try:
        on_a = LoadGroup(nodes[0].url, "sse", [(task, 1) for task in ids])
        on_a.wait_ready()
        time.sleep(3.0)
        held_a = held(nodes[0])
        stats = redis.client.info("commandstats")
        on_a.stop()
        time.sleep(3.0)
        burst = command_counts(redis.client.info("commandstats"), stats)
        log(f"{tree.label}: Redis commands in the 3 s after A's subscribers left: {burst}")
        on_b = LoadGroup(nodes[1].url, "sse", [(task, 1) for task in ids])
        on_b.wait_ready()
        time.sleep(10.0)
        early, early_doubled = unpolled(upstream, ids)
        time.sleep(20.0)
        late, late_doubled = unpolled(upstream, ids)
        whole = command_counts(redis.client.info("commandstats"), stats)
        log(f"{tree.label}: Redis commands from A's subscribers leaving to the end: {whole}")
        registered = redis.client.zrange("relay:nodes", 0, -1)
        live = [n.decode() if isinstance(n, bytes) else str(n) for n in registered]
        log(
            f"{tree.label}: A held {held_a}; with B watching: A holds "
            f"{held(nodes[0])}, B {held(nodes[1])}; unpolled 10-20 s after: "
            f"{len(early)}, 40-50 s after: {len(late)}, their lease holders: "
            f"{holders(redis, late)}; all tasks' lease holders: {holders(redis, ids)}; "
            f"polled twice as often: {early_doubled}, {late_doubled}; "
            f"live nodes {live}"
        )
        if late:
            log(f"{tree.label}: unpolled 40-50 s after: {late[:10]}")
        for name, node in zip("AB", nodes, strict=True):
            lines = log_lines(node)
            log(f"{tree.label}: node {name} logged {len(lines)} lines, first: {lines[:1]}")
            for count, line in grouped(lines)[:8]:
                log(f"    {count} x {line[:300]}")
        on_b.stop()
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default="", help="label=path of the checkout to run")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        run(args.tree, args.tasks)


if __name__ == "__main__":
    main()
