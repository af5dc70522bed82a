"""The simulated upstream on its own: its queue, its outcomes and its random numbers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import httpx
import pytest

from relay.simulator import ADMIT_EVERY, Faults, SimTask, Simulator


def place(task: SimTask, now: float) -> int | None:
    """The task's place in the queue at `now`, None once it left the queue."""
    state = task.state(now)
    return state["lastQueueRemaining"] if state["status"] == "waiting" else None


def starts_at(task: SimTask) -> float:
    return task.created + task.queue_seconds


def test_a_batch_leaves_the_queue_one_by_one_and_each_place_counts_down() -> None:
    simulator = Simulator(fail_rate=0)
    batch = [simulator.start_task(duration=5) for _ in range(12)]
    # In the order they came, one ADMIT_EVERY apart.
    gaps = [starts_at(b) - starts_at(a) for a, b in pairwise(batch)]
    assert gaps == pytest.approx([ADMIT_EVERY] * 11)

    first = batch[0].created + 1e-6
    assert [place(task, first) for task in batch] == list(range(1, 13))
    # Whenever one starts, every task behind it moves up one place.
    for started, task in enumerate(batch, 1):
        now = starts_at(task) + ADMIT_EVERY / 2
        assert task.state(now)["status"] == "running"
        assert [place(t, now) for t in batch[started:]] == list(range(1, 13 - started))
    # The last one counts down through every place, never up.
    seen = [place(batch[-1], first + k * ADMIT_EVERY / 4) for k in range(12 * 4)]
    assert seen == sorted(seen, reverse=True)
    assert set(seen) == set(range(1, 13))


def test_a_later_batch_queues_behind_the_earlier_one() -> None:
    simulator = Simulator(fail_rate=0)
    earlier = [simulator.start_task() for _ in range(3)]
    later = simulator.start_task()
    assert starts_at(later) == pytest.approx(starts_at(earlier[-1]) + ADMIT_EVERY)
    assert place(later, later.created + 1e-6) == 4


def test_an_explicit_queue_time_is_kept_and_counts_down_too() -> None:
    simulator = Simulator(fail_rate=0)
    task = simulator.start_task(queue=3.0, duration=2.0)
    assert task.queue_seconds == 3.0 and task.run_seconds == 2.0
    assert [place(task, task.created + t) for t in (0, 0.5, 1.5, 2.5, 3.0)] == [3, 3, 2, 1, None]
    # Timings given by the caller are not moved by the queue: tests rely on them.
    crowd = [simulator.start_task(queue=0.2, duration=1.0) for _ in range(50)]
    assert all(t.queue_seconds == 0.2 for t in crowd)
    instant = simulator.start_task(queue=0)
    assert instant.state(instant.created)["status"] == "running"


def test_final_state_is_reached_at_the_end_of_queue_and_run() -> None:
    """What tests/conftest.py computes: the state after queue and run."""
    simulator = Simulator(fail_rate=0)
    for task in (simulator.start_task(), simulator.start_task(queue=1, duration=2)):
        end = task.created + task.queue_seconds + task.run_seconds + 1
        assert task.state(end)["status"] == "succeeded"


def test_fail_option_and_fail_rate() -> None:
    never = Simulator(fail_rate=0)
    always = Simulator(fail_rate=1)
    end = 1e9
    assert all(never.start_task().state(end)["status"] == "succeeded" for _ in range(50))
    assert all(always.start_task().state(end)["status"] == "failed" for _ in range(50))
    # `fail` given wins over the rate either way.
    assert always.start_task(fail=False).state(end)["status"] == "succeeded"
    assert never.start_task(fail=True).state(end)["status"] == "failed"
    failed = never.start_task(fail=True).state(end)
    assert failed["message"].startswith("Error occurred when executing ")


def test_a_seed_makes_outcomes_and_faults_repeatable() -> None:
    def run(seed: int) -> tuple[list[float | None], list[str | None]]:
        simulator = Simulator(fail_rate=0.5, seed=seed, faults=Faults(error_rate=0.3))
        outcomes = [simulator.start_task().fail_at for _ in range(40)]
        faults = [simulator.faults.draw(simulator.random) for _ in range(40)]
        return outcomes, faults

    assert run(7) == run(7)
    assert run(7) != run(8)
    outcomes, faults = run(7)
    assert any(at is None for at in outcomes) and any(at is not None for at in outcomes)
    assert "error" in faults and None in faults


def test_the_simulator_never_touches_the_global_random() -> None:
    """Hypothesis warns when a server thread draws from `random` while it draws examples."""
    random.seed(1234)
    before = random.getstate()
    simulator = Simulator(fail_rate=0.5, faults=Faults(error_rate=0.5))
    for _ in range(20):
        simulator.start_task()
        simulator.faults.draw(simulator.random)
    assert random.getstate() == before


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    simulator = Simulator(fail_rate=0, seed=1)
    transport = httpx.ASGITransport(app=simulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield simulator, client


async def test_post_tasks_options(sim: tuple[Simulator, httpx.AsyncClient]) -> None:
    simulator, client = sim

    async def start(body: Any) -> SimTask:
        response = await client.post("/sim/tasks", json=body)
        assert response.status_code == 201, response.text
        return simulator.tasks[response.json()["taskId"]]

    plain = await start({})
    assert plain.queue_seconds >= ADMIT_EVERY and plain.fail_at is None
    behind = await start(None)  # no body at all: every option takes its default
    assert starts_at(behind) == pytest.approx(starts_at(plain) + ADMIT_EVERY)
    given = await start({"queue": 0.5, "duration": 2, "fail": True})
    assert (given.queue_seconds, given.run_seconds) == (0.5, 2.0)
    assert given.fail_at is not None
    assert (await start({"fail": False})).fail_at is None

    for bad in ({"queue": -1}, {"duration": 0}, {"fail": "yes"}, [1], {"queue": "soon"}):
        response = await client.post("/sim/tasks", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["code"] == "bad_request"

    waiting = (await client.post("/scc/comfy_get_progress", json={"taskId": given.task_id})).json()
    assert waiting["data"]["status"] == "waiting"
    assert waiting["data"]["lastQueueRemaining"] == 1
