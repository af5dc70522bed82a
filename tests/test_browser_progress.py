"""onProgress and reconnecting in Chromium, with the relay and simulator as processes.

The page imports /static/relay-client.js itself and logs, with the page's clock, every state,
every onProgress value and the end; the demo page's bars are checked to use the same values.
Reconnecting: the relay is killed and started again on its port while the client waits out
a long backoff; the browser's `online` event, or the page becoming visible, must bring it
back at once. Fixtures and helpers are test_browser.py's.
"""

from __future__ import annotations

import itertools
import signal
from typing import Any

import pytest
from playwright.async_api import Page, expect

from . import test_browser
from .test_browser import Servers, card, free_port, open_demo, start_sim_task, watch

# test_browser.py's fixtures: a browser, a page that fails on uncaught errors, the servers.
browser = test_browser.browser
page = test_browser.page
servers = test_browser.servers

# What a page logs while following one task: ["state", t, progress, status] at each state,
# ["progress", t, value] at each onProgress call, ["end", t, status].
FOLLOW = """
async ([taskId, transport, options]) => {
    const { RelayClient } = await import("/static/relay-client.js");
    const relay = new RelayClient(location.origin, options);
    window.relay = relay;
    window.log = [];
    const log = window.log;
    return await new Promise((resolve, reject) => {
        relay.subscribe(taskId, {
            transport,
            onState: (s) => log.push(["state", performance.now(), s.progress ?? 0, s.status]),
            onProgress: (value) => log.push(["progress", performance.now(), value]),
            onEnd: ({ status }) => { log.push(["end", performance.now(), status]); resolve(log); },
            onError: (e) => { if (!e.retrying) reject(new Error(e.code)); },
        });
    });
}
"""
MAX_LEAD = 0.1  # DEFAULT_SMOOTHING.maxLead


async def blank_page_on(page: Page, base: str) -> None:
    """A page of the relay's origin, so that it may import the client and open streams."""
    await page.goto(f"{base}/static/relay-client.js")


def assert_smooth_monotone_progress(log: list[list[Any]]) -> None:
    values = [entry[2] for entry in log if entry[0] == "progress"]
    assert values, log
    assert all(b >= a for a, b in itertools.pairwise(values)), "the value went back"
    assert values[-1] == 1, "exactly 1 at the success"
    assert [entry[0] for entry in log[-2:]] == ["progress", "end"], log[-3:]
    assert log[-1][2] == "succeeded"

    # Never far ahead of what the upstream said, and never 1 before it said succeeded.
    reported = 0.0
    for entry in log:
        if entry[0] == "state":
            reported = max(reported, entry[2])
            succeeded = entry[3] == "succeeded"
        elif entry[0] == "progress" and not succeeded:
            assert entry[2] <= reported + MAX_LEAD + 1e-9, (entry, reported)
            assert entry[2] < 1

    # Between two states of the running task, the value kept moving, frame after frame.
    states = [i for i, entry in enumerate(log) if entry[0] == "state"]
    moving = [
        len({entry[2] for entry in log[a + 1 : b] if entry[0] == "progress"})
        for a, b in itertools.pairwise(states)
        if log[a][3] == "running" and log[b][3] == "running"
    ]
    assert moving, "no two running states"
    assert max(moving) >= 10, f"values between two states: {moving}"
    assert sum(1 for n in moving if n >= 3) >= len(moving) // 2, moving


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_on_progress_moves_between_polls_never_back_and_ends_at_one(
    servers: Servers, page: Page, transport: str
) -> None:
    # Polls a second apart, as by default: the bar must move in between.
    _, base = await servers.relay(None, "--poll-interval", "1")
    await blank_page_on(page, base)
    task_id = await start_sim_task(base, duration=6, queue=0.5, fail=False)
    log = await page.evaluate(FOLLOW, [task_id, transport, {}])
    assert_smooth_monotone_progress(log)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_demo_bars_follow_on_progress(
    servers: Servers, page: Page, transport: str
) -> None:
    _, base = await servers.relay(None, "--poll-interval", "1")
    await open_demo(page, base, transport=transport)
    task_id = await start_sim_task(base, duration=4, queue=0, fail=False)
    await watch(page, task_id)
    task = card(page, task_id)
    await expect(task).to_have_attribute("data-status", "running")
    widths = []
    for _ in range(12):  # 1.2 s: at least one poll apart
        widths.append(
            await task.locator(".bar-fill").evaluate("(el) => parseFloat(el.style.width)")
        )
        await page.wait_for_timeout(100)
    assert len(set(widths)) >= 6, f"the bar stood still between polls: {widths}"
    assert widths == sorted(widths)
    await expect(task).to_have_attribute("data-status", "succeeded", timeout=20_000)
    values = await page.evaluate("(id) => window.relayProgress[id]", task_id)
    assert values == sorted(values) and values[-1] == 1
    await expect(task.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert await task.locator(".bar-fill").evaluate("(el) => parseFloat(el.style.width)") == 100


# A backoff far longer than the test waits: a reconnect within it came from an event.
SLOW_BACKOFF = {"backoffInitialMs": 60_000, "backoffMaxMs": 60_000}
START_FOLLOWING = """
async ([taskId, transport, options]) => {
    const { RelayClient } = await import("/static/relay-client.js");
    const relay = new RelayClient(location.origin, options);
    window.relay = relay;
    window.states = [];
    relay.subscribe(taskId, { transport, onState: (s) => window.states.push(s) });
}
"""


async def connection(page: Page) -> Any:
    return await page.evaluate("window.relay.connectionState().state")


async def follow_and_lose_the_relay(
    servers: Servers, page: Page, transport: str
) -> tuple[str, int]:
    """A page follows a long task over `transport`; the relay crashes and comes back."""
    upstream = await servers.simulator()
    port = free_port()
    relay, base = await servers.relay(port, "--upstream", upstream, "--signing", "none")
    await blank_page_on(page, base)
    task_id = await start_sim_task(upstream, duration=60, queue=0, fail=False)
    await page.evaluate(START_FOLLOWING, [task_id, transport, SLOW_BACKOFF])
    await page.wait_for_function("window.states.length > 0")
    assert await connection(page) == "open"

    relay.stop(signal.SIGKILL)
    await page.wait_for_function("window.relay.connectionState().state === 'down'")
    await servers.relay(port, "--upstream", upstream, "--signing", "none")
    await page.wait_for_timeout(1500)
    assert await connection(page) == "down", "it came back before its backoff: no test"
    return task_id, await page.evaluate("window.states.length")


@pytest.mark.timeout(90)
async def test_back_online_reconnects_at_once(servers: Servers, page: Page) -> None:
    # The WebSocket, which waits out the client's backoff. An EventSource the browser retries
    # by itself (every few seconds) is re-opened too: tests/js/reconnect.test.mjs.
    _, seen = await follow_and_lose_the_relay(servers, page, "ws")
    await page.context.set_offline(True)
    await page.context.set_offline(False)  # the browser's `online` event
    await page.wait_for_function("window.relay.connectionState().state === 'open'", timeout=5000)
    await page.wait_for_function(f"window.states.length > {seen}", timeout=5000)


@pytest.mark.timeout(90)
async def test_a_page_shown_again_reconnects_at_once(servers: Servers, page: Page) -> None:
    _, seen = await follow_and_lose_the_relay(servers, page, "ws")
    # Headless Chromium's pages are always visible: say the page was hidden and is shown.
    await page.evaluate(
        """() => {
            let state = "hidden";
            Object.defineProperty(document, "visibilityState", { get: () => state });
            document.dispatchEvent(new Event("visibilitychange"));
            window.show = () => {
                state = "visible";
                document.dispatchEvent(new Event("visibilitychange"));
            };
        }"""
    )
    await page.wait_for_timeout(300)
    assert await connection(page) == "down", "hidden: it waits"
    await page.evaluate("window.show()")
    await page.wait_for_function("window.relay.connectionState().state === 'open'", timeout=5000)
    await page.wait_for_function(f"window.states.length > {seen}", timeout=5000)
