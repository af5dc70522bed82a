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
import time

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


def unpolled(upstream: Server, ids: list[str], seconds: float = 10.0) -> list[str]:
    before = task_calls(upstream, ids)
    time.sleep(seconds)
    after = task_calls(upstream, ids)
    return [task for task, a, b in zip(ids, before, after, strict=True) if a == b]


def holders(redis: RedisServer, tasks: list[str]) -> dict[str, int]:
    """Lease holders of `tasks` in Redis (either key layout), 'none' for a free lease."""
    counts: dict[str, int] = {}
    for task in tasks:
        value = redis.client.get(f"relay:{{{task}}}:lease") or redis.client.get(
            f"relay:lease:{task}"
        )
        name = value.decode() if isinstance(value, bytes) else "none"
        counts[name] = counts.get(name, 0) + 1
    return counts


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
        held_a = leases_held(nodes[0])
        on_a.stop()
        time.sleep(3.0)
        on_b = LoadGroup(nodes[1].url, "sse", [(task, 1) for task in ids])
        on_b.wait_ready()
        time.sleep(10.0)
        early = unpolled(upstream, ids)
        time.sleep(20.0)
        late = unpolled(upstream, ids)
        registered = redis.client.zrange("relay:nodes", 0, -1)
        live = [n.decode() if isinstance(n, bytes) else str(n) for n in registered]
        log(
            f"{tree.label}: A held {held_a}; with B watching: A holds "
            f"{leases_held(nodes[0])}, B {leases_held(nodes[1])}; unpolled 10-20 s after: "
            f"{len(early)}, 40-50 s after: {len(late)}, their lease holders: "
            f"{holders(redis, late)}; live nodes {live}"
        )
        lines = log_lines(*nodes)
        if lines:
            log(f"{tree.label}: the relays logged {len(lines)} lines, first: {lines[0]}")
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
