"""`Placement`'s rules (relay/cluster/placement.py), on what a node read, without Redis.

Expiry times are on a clock the test sets; the rules' own timers (`grace`, `settle`) run
on `time.monotonic`, so the lease period here is short and the tests sleep through it.
"""

from __future__ import annotations

import time
from collections import Counter

from relay.cluster.placement import SETTLE_LEASE_PERIODS, Placement, preferred, weight

LEASE_TTL = 0.03  # grace 0.02 s, settle 0.3 s
NOW = 1000.0
LIVE = NOW + 60  # an expiry still to come
DEAD = NOW - 1  # one already past
TASKS = [f"task-{n}" for n in range(2000)]


def node(node_id: str, lease_ttl: float = LEASE_TTL) -> Placement:
    return Placement(node_id, lease_ttl, clock=lambda: NOW)


def ranked(task_id: str, nodes: list[str]) -> list[str]:
    """The nodes by their weight for the task, highest first."""
    return sorted(nodes, key=lambda n: weight(n, task_id), reverse=True)


def seeing(placement: Placement, task_id: str, watchers: list[str]) -> Placement:
    """Every watcher alive and watching the task, as read from the registry and interest."""
    placement.saw_nodes(dict.fromkeys(watchers, LIVE))
    placement.saw_watchers(task_id, dict.fromkeys(watchers, LIVE))
    return placement


# -- rendezvous hashing ---------------------------------------------------------------------------


def test_weight_is_the_same_on_every_node_and_differs_per_task() -> None:
    assert weight("a", "t1") == weight("a", "t1")
    assert weight("a", "t1") != weight("a", "t2")
    assert weight("a", "t1") != weight("b", "t1")
    assert preferred("t1", []) is None
    assert preferred("t1", ["a", "b", "c"]) == ranked("t1", ["a", "b", "c"])[0]


def test_each_node_is_preferred_for_about_its_share() -> None:
    nodes = ["a", "b", "c", "d"]
    shares = Counter(preferred(task, nodes) for task in TASKS)
    assert set(shares) == set(nodes)
    for count in shares.values():
        assert abs(count - len(TASKS) / 4) < len(TASKS) / 4 * 0.2, shares


def test_a_node_that_leaves_or_joins_moves_only_its_own_share() -> None:
    before = {task: preferred(task, ["a", "b", "c", "d"]) for task in TASKS}
    gone = {task: preferred(task, ["a", "b", "c"]) for task in TASKS}
    moved = [task for task in TASKS if gone[task] != before[task]]
    assert moved and all(before[task] == "d" for task in moved)
    joined = {task: preferred(task, ["a", "b", "c", "d", "e"]) for task in TASKS}
    moved = [task for task in TASKS if joined[task] != before[task]]
    assert moved and all(joined[task] == "e" for task in moved)


# -- who is a candidate -------------------------------------------------------------------------


def test_the_choice_is_among_live_nodes_watching_the_task() -> None:
    task = TASKS[0]
    best, second, third = ranked(task, ["a", "b", "c"])
    me = node(third)
    seeing(me, task, [best, second, third])
    assert me.choice(task) == best
    me.saw_nodes({best: DEAD, second: LIVE, third: LIVE})  # best's heartbeat stopped
    assert me.choice(task) == second
    me.saw_watchers(task, {best: LIVE, second: DEAD, third: LIVE})  # second's interest lapsed
    assert me.choice(task) == third
    me.saw_nodes({})  # this node's own entry is not needed: it knows it is alive
    assert me.choice(task) == third
    assert node("x").choice(task) is None, "no one seen watching it"


# -- a free lease ---------------------------------------------------------------------------------


def test_the_preferred_node_takes_a_free_lease_at_once() -> None:
    task = TASKS[1]
    best, other = ranked(task, ["a", "b"])
    assert seeing(node(best), task, [best, other]).should_take(task)


def test_a_node_with_no_one_else_watching_takes_at_once() -> None:
    task = TASKS[2]
    assert node("a").should_take(task), "nothing read yet"
    assert seeing(node("a"), task, ["a"]).should_take(task)


def test_another_node_leaves_a_free_lease_to_the_preferred_one_for_the_grace() -> None:
    task = TASKS[3]
    best, other = ranked(task, ["a", "b"])
    me = seeing(node(other), task, [best, other])
    assert me.grace == 2 * LEASE_TTL / 3
    assert not me.should_take(task)
    assert not me.should_take(task)
    time.sleep(me.grace)
    assert me.should_take(task), "the preferred node never took it"


def test_the_grace_starts_again_when_the_preferred_node_changes() -> None:
    task = TASKS[4]
    best, second, third = ranked(task, ["a", "b", "c"])
    me = seeing(node(third), task, [best, second, third])
    assert not me.should_take(task)
    time.sleep(me.grace)
    me.saw_nodes({second: LIVE, third: LIVE})  # best is gone; now second is preferred
    assert not me.should_take(task)
    time.sleep(me.grace)
    assert me.should_take(task)


def test_a_lease_seen_held_elsewhere_ends_the_wait() -> None:
    task = TASKS[5]
    best, other = ranked(task, ["a", "b"])
    me = seeing(node(other), task, [best, other])
    assert not me.should_take(task)
    time.sleep(me.grace)
    me.held_elsewhere(task)  # the preferred node took it meanwhile, then let it go
    assert not me.should_take(task), "a new wait, not the old one"


# -- a held lease -------------------------------------------------------------------------------


def test_a_holder_hands_over_to_the_preferred_node_only_after_settling() -> None:
    task = TASKS[6]
    best, other = ranked(task, ["a", "b"])
    holder = seeing(node(other), task, [best, other])
    assert holder.settle == SETTLE_LEASE_PERIODS * LEASE_TTL
    holder.took(task)
    assert holder.hand_over_to(task) is None, "a task shorter than settle never moves"
    time.sleep(holder.settle / 2)
    holder.took(task)  # taken again while held: the time held counts from the first take
    time.sleep(holder.settle / 2)
    assert holder.hand_over_to(task) == best
    holder.gave_up(task)
    assert holder.hand_over_to(task) is None, "given up: nothing to hand over"


def test_the_preferred_node_keeps_what_it_holds() -> None:
    task = TASKS[7]
    best, other = ranked(task, ["a", "b"])
    holder = seeing(node(best), task, [best, other])
    holder.took(task)
    time.sleep(holder.settle)
    assert holder.hand_over_to(task) is None
    assert node("x").hand_over_to(task) is None, "never held"


# -- what is remembered -------------------------------------------------------------------------


def test_tasks_not_asked_about_lately_are_forgotten() -> None:
    old, fresh = TASKS[8], TASKS[9]
    best, other = ranked(old, ["a", "b"])
    me = seeing(node(other), old, [best, other])
    assert not me.should_take(old)
    time.sleep(0.05)
    me.saw_watchers(fresh, {other: LIVE})
    me.forget_stale(older_than=0.04)
    assert set(me.watchers) == {fresh}
    assert old not in me.waiting
    assert me.choice(old) is None
