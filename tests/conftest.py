from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sse_starlette.sse import AppStatus

from relay.app import create_app
from relay.config import Settings
from relay.simulator import Simulator

from .servers import RedisServer, ThreadServer

FAST = Settings(poll_interval=0.1, linger=0.3, backoff_max=0.5, ping_interval=1.0)


@pytest.fixture(autouse=True)
def reset_sse_exit_flag() -> Iterator[None]:
    """sse-starlette keeps a process-wide "shutting down" flag, which the relay's watchdog
    reads (`workarounds.server_exiting`) and tests/test_workarounds.py sets: no test may
    inherit it."""
    AppStatus.should_exit = False
    yield
    AppStatus.should_exit = False


class SimulatedUpstream:
    def __init__(self) -> None:
        self.simulator = Simulator(fail_rate=0.0)
        self.server = ThreadServer(self.simulator.app).start()
        self.url = self.server.url

    def start_task(self, queue: float = 0.3, duration: float = 1.5, fail: bool = False) -> str:
        return self.simulator.start_task(queue=queue, duration=duration, fail=fail).task_id

    def calls(self, task_id: str) -> int:
        return self.simulator.calls[task_id]

    def final_state(self, task_id: str, with_result: bool = True) -> dict[str, Any]:
        """The task's last state as the relay should deliver it (with the result, by default)."""
        task = self.simulator.tasks[task_id]
        state = task.state(task.created + task.queue_seconds + task.run_seconds + 1)
        if with_result and state["status"] == "succeeded":
            result = task.result()
            # As the relay hands it on: image URLs made absolute against this upstream.
            state["result"] = {**result, "images": [self.url + i for i in result["images"]]}
        return state


@pytest.fixture
def upstream() -> Iterator[SimulatedUpstream]:
    sim = SimulatedUpstream()
    yield sim
    sim.server.stop()


RelayFactory = Callable[..., ThreadServer]


@pytest.fixture
def make_relay(upstream: SimulatedUpstream) -> Iterator[RelayFactory]:
    """Start relays on the simulated upstream; keyword arguments override settings."""
    servers: list[ThreadServer] = []

    def start(**overrides: Any) -> ThreadServer:
        settings = replace(FAST, upstream_url=upstream.url, **overrides)
        server = ThreadServer(create_app(settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def relay(make_relay: RelayFactory) -> ThreadServer:
    return make_relay()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=500)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        yield client


# -- test tiers -----------------------------------------------------------------------------------
# The fast tier: python3 -m pytest -q -m "not browser and not cluster and not slow" (under two
# minutes on a 2-core machine; plain `python3 -m pytest -q` still runs everything). The markers
# are registered in pyproject.toml and applied here, by module and by test name, so that the
# modules themselves need no change; the fuzz modules mark their own slow tests.

MODULE_MARKERS = {
    "test_browser": "browser",  # Playwright driving Debian chromium
    "test_browser_progress": "browser",  # onProgress and reconnecting, in Chromium too
    "test_framework_example": "browser",  # examples/react's hook, in Chromium
    "test_relay_client_js": "browser",  # the browser client's JavaScript tests, run by Node
    "test_client_package": "browser",  # the browser client packed by npm, checked by tsc
    "test_cluster": "cluster",  # relay processes sharing Redis
    "test_soak": "slow",  # a bounded soak: 35 s of churn (SOAK_SECONDS), then a wait for TTLs
    "test_slow_clients": "slow",  # 8 s of fat states per transport, and a relay process
}

# Single tests that took 2.5 s or more (setup and teardown included) in either of two runs of
# the fast tier, in otherwise fast modules, as "module::test" (all its parametrizations).
# Following one default simulated task (0.3 s queued, 1.5 s running) takes about 2.2 s, the
# floor for most tests here.
SLOW_TESTS = {
    # 32 s: 200 tasks polled once each at 20 calls a second (10 s), 2 s of counting, and
    # its two sockets, never read, each wait out websockets' 10 s close timeout.
    "test_budget::test_two_hundred_tasks_share_twenty_calls_a_second_fairly",
    # 13 s: a 3.3 s task, then 10 s closing a socket it stopped reading (the client's full
    # queue hides the relay's close frame until websockets' close timeout).
    "test_limits::test_subscriptions_that_need_a_loop_past_the_cap_get_overloaded",
    # 5 s: starts a relay process, and follows a 3.2 s task to its end.
    "test_limits::test_oversized_frame_closes_1009_and_other_clients_carry_on",
    # 5 s: follows a task that waits 3 s in the queue and runs 2 s, to compare poll rates.
    "test_poll_loop::test_waiting_tasks_cost_fewer_calls_than_running_ones",
    # 4 s: starts a relay process, kills and restarts it around a 3.2 s task.
    "test_sse_multiplexed::test_resume_after_a_relay_restart_gets_a_snapshot",
    # 3.8 s: a 3.2 s task over two streams, 0.6 s apart.
    "test_sse::test_resume_with_last_event_id_gets_one_combined_patch",
    # 3.7 s: teardown waits about 2 s for the simulated 3 s hang still in flight.
    "test_poll_loop::test_a_hanging_result_call_does_not_hold_the_end_back",
    # 3.6 s: a 3.2 s task, resubscribed to after 0.5 s away.
    "test_ws::test_resubscribe_with_last_seq_gets_a_patch",
    # 3.4 s: five 1.2 s tasks followed one after another through injected faults.
    "test_upstream::test_flapping_upstream_never_loses_the_final_state",
    # 2.9 s: 1.5 s of 429s by design, then five tasks to their end.
    "test_budget::test_a_429_storm_slows_the_relay_and_it_recovers",
    # 2.8 s: 101 subscribers follow two 2.3 s tasks.
    "test_hub::test_fifty_sse_and_fifty_ws_subscribers_cost_one_loop",
    # 2.8 s: a relay process logging at debug level.
    "test_tokens::test_tokens_and_the_secret_never_reach_the_log",
    # 2.7 s: a hundred subscribe rounds against 10 ms of upstream latency, then a task.
    "test_upstream::test_pool_of_two_survives_a_hundred_subscribe_rounds",
    # 2.6 s: a visit, 0.3 s away, then a 2.2 s task followed to its end.
    "test_hub::test_a_subscriber_within_the_linger_keeps_the_loop",
    # 2.3-3.6 s: starts a relay process logging at debug level, follows a 1.2 s task twice.
    "test_app::test_secret_never_leaves_the_server",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    modules: dict[str, object] = {}
    for item in items:
        module = item.path.stem
        modules[module] = getattr(item, "module", None)
        if module in MODULE_MARKERS:
            item.add_marker(MODULE_MARKERS[module])
        if f"{module}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
            item.add_marker("slow")
    for name in sorted(SLOW_TESTS):
        module, _, test = name.partition("::")
        if module in modules and not hasattr(modules[module], test):
            warnings.warn(
                f"SLOW_TESTS in tests/conftest.py names {name}, which is gone", stacklevel=1
            )


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis: RELAY_TEST_REDIS_URL when given, else a redis-server started here."""
    given = os.environ.get("RELAY_TEST_REDIS_URL")
    if given:
        import redis as redis_sync

        redis_sync.Redis.from_url(given).flushdb()
        yield given
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer().start()
    yield server.url
    server.stop()
