from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sse_starlette.sse import AppStatus

from relay.app import create_app
from relay.config import Settings
from relay.simulator import Simulator

from .servers import ThreadServer

FAST = Settings(poll_interval=0.1, linger=0.3, backoff_max=0.5, ping_interval=1.0)


@pytest.fixture(autouse=True)
def reset_sse_exit_flag() -> Iterator[None]:
    """sse-starlette keeps a process-wide "shutting down" flag; no test may inherit one."""
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
            state["result"] = task.result()
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
