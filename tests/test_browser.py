"""The demo page and static/relay-client.js in a real browser (Debian's Chromium).

Each test runs its own relay (and, for the restart test, its own simulator) as a
subprocess on a free loopback port, drives the page with Playwright's async API
and compares what the page reconstructed with what the relay holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio

from relay.sse import parse_stream_id

from .rfc7396 import EXAMPLES as RFC7396

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
POLL = "0.2"
STEP_TEXT = re.compile(r"^Node step \d+ of \d+$")
OUTAGE = re.compile(r"^(down|reconnecting)$")

if not CHROMIUM.exists():
    pytest.skip(
        f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium); "
        "no browser is downloaded",
        allow_module_level=True,
    )

from playwright.async_api import (  # noqa: E402
    Browser,
    Page,
    Request,
    async_playwright,
    expect,
)

expect.set_options(timeout=30_000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A `python -m relay ...` subprocess with its output in a log file."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "relay", *args]
        self.log = Path(tempfile.mkstemp(prefix="relay-", suffix=".log")[1])
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        environ.update(env or {}, PYTHONUNBUFFERED="1")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def wait_healthy(self, url: str, seconds: float = 20.0) -> None:
        try:
            async with asyncio.timeout(seconds), httpx.AsyncClient(timeout=1.0) as client:
                while True:
                    if self.proc.poll() is not None:
                        raise AssertionError(
                            f"{' '.join(self.args)} exited with {self.proc.returncode}:\n"
                            f"{self.output()}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            return
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"{url} did not answer in {seconds} s:\n{self.output()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        print(f"--- {' '.join(self.args[2:])} ---\n{self.output()}")
        self.log.unlink(missing_ok=True)


class Servers:
    """Starts relays and simulators for one test and stops them all at its end."""

    def __init__(self) -> None:
        self.processes: list[Process] = []

    async def relay(
        self, port: int | None = None, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[Process, str]:
        port = port or free_port()
        process = Process("serve", "--port", str(port), "--poll-interval", POLL, *extra, env=env)
        self.processes.append(process)
        base = f"http://127.0.0.1:{port}"
        await process.wait_healthy(f"{base}/healthz")
        return process, base

    async def simulator(self) -> str:
        port = free_port()
        process = Process("simulate", "--port", str(port))
        self.processes.append(process)
        base = f"http://127.0.0.1:{port}"
        await process.wait_healthy(f"{base}/sim/stats")  # the simulator has no /healthz
        return base

    def close(self) -> None:
        for process in reversed(self.processes):
            process.close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    started = Servers()
    try:
        yield started
    finally:
        started.close()


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The page works offline: no font, script or style from anywhere but the relay.
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda request: (
            elsewhere.append(request.url)
            if urlsplit(request.url).hostname not in (None, "127.0.0.1", "localhost")
            else None
        ),
    )
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"uncaught errors on the page: {errors}"
    assert not elsewhere, f"requests that left the machine: {elsewhere}"


async def start_sim_task(base: str, **options: Any) -> str:
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.post(f"{base}/sim/tasks", json=options)
    assert response.status_code == 201, response.text
    task_id = response.json()["taskId"]
    assert isinstance(task_id, str)
    return task_id


async def server_state(base: str, task_id: str) -> Any:
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.get(f"{base}/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def client_state(page: Page, task_id: str) -> Any:
    return await page.evaluate("(id) => window.relayStates[id] ?? null", task_id)


async def watch(page: Page, task_id: str) -> None:
    await page.fill("#watch-id", task_id)
    await page.click("#watch-button")


def card(page: Page, task_id: str) -> Any:
    return page.locator(f'li.card[data-task-id="{task_id}"]')


async def open_demo(page: Page, base: str, **params: str) -> None:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    await page.goto(f"{base}/?{query}")
    await expect(page.locator("html")).to_have_attribute("data-ready", "true")


def record_event_sources(page: Page) -> list[str]:
    """The URLs of the EventSources the page opens, in order."""
    urls: list[str] = []

    def seen(request: Request) -> None:
        if request.resource_type == "eventsource":
            urls.append(request.url)

    page.on("request", seen)
    return urls


def record_resume_positions(page: Page) -> list[str | None]:
    """For each EventSource request and WebSocket `subscribe`, the position it resumes from."""
    positions: list[str | None] = []

    async def request(request: Request) -> None:
        if request.resource_type == "eventsource":
            query = parse_qs(urlsplit(request.url).query)
            header = (await request.all_headers()).get("last-event-id")  # `headers` hides it
            positions.append(header or query.get("lastEventId", [None])[0])

    def frame(payload: str | bytes) -> None:
        message = json.loads(payload)
        if message.get("type") == "subscribe":
            seq = message.get("lastSeq")
            positions.append(None if seq is None else str(seq))

    page.on("request", request)
    page.on("websocket", lambda socket: socket.on("framesent", frame))
    return positions


def start_button(page: Page, count: int) -> Any:
    return page.get_by_role("button", name=f"Start {count}", exact=True)


async def summary_and_badges(page: Page) -> tuple[str, list[str]]:
    """The summary line and every card's badge, read at one instant."""
    summary, badges = await page.evaluate(
        """() => [
            document.getElementById("summary").textContent,
            [...document.querySelectorAll("li.card .status-text")].map((b) => b.textContent),
        ]"""
    )
    return summary, badges


async def assert_summary_counts_badges(page: Page) -> None:
    summary, badges = await summary_and_badges(page)
    total, *parts = summary.split(" · ")
    assert total == f"{len(badges)} {'task' if len(badges) == 1 else 'tasks'}", summary
    counted = {label: int(n) for n, label in (part.split(" ", 1) for part in parts)}
    expected = {b.lower(): badges.count(b) for b in set(badges)}
    assert counted == expected, (summary, badges)


def assert_sentence(text: str) -> None:
    """Error text for a person: a capitalised sentence, no raw error code."""
    assert re.fullmatch(r"[A-Z][^_]*[.…]", text), text


async def bar_value(page: Page, task_id: str) -> int:
    value = await card(page, task_id).get_by_role("progressbar").get_attribute("aria-valuenow")
    return int(value or 0)


# ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_started_task_progresses_to_success(
    servers: Servers, page: Page, transport: str
) -> None:
    _, base = await servers.relay()
    await open_demo(page, base, transport=transport, duration="3", queue="1", fail="false")

    await start_button(page, 1).click()
    cards = page.locator("li.card")
    await expect(cards).to_have_count(1)
    task_id = await cards.first.get_attribute("data-task-id")
    assert task_id
    task = card(page, task_id)
    await expect(task).to_have_attribute("data-transport", transport)

    # It runs: the bar moves, the card shows the node and the step.
    await expect(task).to_have_attribute("data-status", "running")
    await expect(task.locator(".step")).to_have_text(STEP_TEXT)
    bar = task.get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuemin", "0")
    await expect(bar).to_have_attribute("aria-valuemax", "100")

    await expect(task).to_have_attribute("data-status", "succeeded")
    await expect(bar).to_have_attribute("aria-valuenow", "100")
    await expect(task.locator(".status-text")).to_have_text("Succeeded")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "idle", timeout=10_000
    )
    log = await page.evaluate("window.relayConnectionLog")
    assert "open" in log, log


@pytest.mark.timeout(60)
async def test_a_relay_with_a_real_upstream_has_no_start_buttons(
    servers: Servers, page: Page
) -> None:
    """On a relay polling `relay simulate`, the page offers no Start buttons (the relay has no
    simulator to start tasks on), and a task's image comes from the upstream that made it."""
    upstream = await servers.simulator()
    _, base = await servers.relay(None, "--upstream", upstream, "--signing", "none")
    await open_demo(page, base)
    await expect(page.locator("html")).to_have_attribute("data-simulator", "off")
    await expect(start_button(page, 1)).to_be_hidden()
    await expect(page.locator("#sim-fail")).to_be_hidden()
    await expect(page.locator(".sim-options")).to_be_hidden()
    await expect(page.get_by_label("Watch a task ID")).to_be_visible()
    await expect(page.locator("#empty [data-without-simulator]")).to_be_visible()
    await expect(page.locator("#empty [data-needs-simulator]")).to_be_hidden()

    task_id = await start_sim_task(upstream, duration=0.5, queue=0, fail=False)
    await watch(page, task_id)
    image = card(page, task_id).locator(".images img")
    await expect(image).to_have_attribute("src", f"{upstream}/sim/images/{task_id}.svg")
    await expect(image).to_be_visible()
    assert await image.evaluate("(img) => img.complete && img.naturalWidth > 0")

    # The relay's embedded simulator: the buttons are there.
    _, embedded = await servers.relay()
    await open_demo(page, embedded)
    await expect(page.locator("html")).to_have_attribute("data-simulator", "on")
    await expect(start_button(page, 1)).to_be_visible()


@pytest.mark.timeout(60)
async def test_on_a_phone_the_summary_and_the_placeholder_fit(
    servers: Servers, browser: Browser
) -> None:
    """At 390 px: the summary has the page's width below "Clear finished" instead of
    wrapping in what is left beside it, the whole placeholder shows, and the card says
    what its numbers count."""
    _, base = await servers.relay()
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    page = await context.new_page()
    try:
        running = [await start_sim_task(base, duration=30, queue=0, fail=False) for _ in "ab"]
        done = await start_sim_task(base, duration=0.5, queue=0, fail=False)
        failed = await start_sim_task(base, duration=0.5, queue=0, fail=True)
        waiting = await start_sim_task(base, duration=5, queue=60, fail=False)
        await open_demo(page, base)
        for task_id in (*running, done, failed, waiting, "no-such-task-390"):
            await watch(page, task_id)
        await expect(card(page, failed)).to_have_attribute("data-status", "failed")
        await expect(card(page, done)).to_have_attribute("data-status", "succeeded")
        await expect(card(page, running[0]).locator(".step")).to_have_text(STEP_TEXT)
        await expect(card(page, running[0]).locator(".meta")).to_contain_text("% of the task")
        summary = page.locator("#summary")
        await expect(summary).to_contain_text("not found")

        layout = await page.evaluate(
            """() => {
                const box = (el) => el.getBoundingClientRect();
                const summary = document.getElementById("summary");
                const clear = document.getElementById("clear-finished");
                const input = document.getElementById("watch-id");
                const style = getComputedStyle(input);
                const probe = document.createElement("span");
                probe.style.font = getComputedStyle(input, "::placeholder").font;
                probe.style.whiteSpace = "pre";
                probe.textContent = input.placeholder;
                document.body.append(probe);
                const text = probe.getBoundingClientRect().width;
                probe.remove();
                const room = input.clientWidth - parseFloat(style.paddingLeft)
                    - parseFloat(style.paddingRight);
                return {
                    summaryTop: box(summary).top, clearBottom: box(clear).bottom,
                    summaryWidth: box(summary).width,
                    text, room, pageWidth: document.documentElement.scrollWidth,
                };
            }"""
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "demo-390.png"), full_page=False)
    finally:
        await context.close()
    # Below the button, the whole width its own: not squeezed beside it.
    assert layout["summaryTop"] >= layout["clearBottom"] - 1, layout
    assert layout["summaryWidth"] >= 390 - 2 * 24, layout
    assert layout["text"] <= layout["room"], layout  # the placeholder is not cut
    assert layout["pageWidth"] <= 390, layout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_client_state_equals_server_state(
    servers: Servers, page: Page, transport: str
) -> None:
    """Snapshot plus merge patches give exactly the state the relay holds."""
    _, base = await servers.relay()
    sockets: list[Any] = []
    page.on("websocket", lambda socket: sockets.append(socket))
    await open_demo(page, base, transport=transport)
    ok = await start_sim_task(base, duration=3, queue=1, fail=False)
    failing = await start_sim_task(base, duration=3, queue=0.5, fail=True)
    for task_id in (ok, failing):
        await watch(page, task_id)

    seen_running: dict[str, Any] = {}
    await expect(card(page, ok)).to_have_attribute("data-status", "running")
    seen_running[ok] = await client_state(page, ok)

    await expect(card(page, ok)).to_have_attribute("data-status", "succeeded")
    await expect(card(page, failing)).to_have_attribute("data-status", "failed")
    await expect(card(page, failing).locator(".status-text")).to_have_text("Failed")

    for task_id, status in ((ok, "succeeded"), (failing, "failed")):
        mine = await client_state(page, task_id)
        theirs = await server_state(base, task_id)
        assert mine == theirs, f"{task_id}: client {json.dumps(mine)} != relay {json.dumps(theirs)}"
        assert mine["status"] == status
    assert seen_running[ok]["status"] == "running"
    assert "state" in seen_running[ok]
    # the patch that ended the run removed the fields the final state does not have
    assert "state" not in await client_state(page, ok)
    assert len(sockets) == (1 if transport == "ws" else 0), "one WebSocket for the page"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("transport", "how"),
    [
        pytest.param("sse", signal.SIGKILL, id="sse-crash"),
        pytest.param("sse", signal.SIGTERM, id="sse-shutdown"),
        pytest.param("ws", signal.SIGKILL, id="ws-crash"),
        pytest.param("ws", signal.SIGTERM, id="ws-shutdown"),
    ],
)
async def test_relay_restart_mid_task(
    servers: Servers, page: Page, transport: str, how: signal.Signals
) -> None:
    """The relay goes away mid-task; the page shows it, reconnects by itself and finishes."""
    upstream = await servers.simulator()
    port = free_port()
    relay, base = await servers.relay(port, "--upstream", upstream, "--signing", "none")
    positions = record_resume_positions(page)
    await open_demo(page, base, transport=transport)
    task_id = await start_sim_task(upstream, duration=8, queue=0.5, fail=False)
    await watch(page, task_id)

    task = card(page, task_id)
    await expect(task).to_have_attribute("data-status", "running")
    indicator = page.locator("#connection")
    await expect(indicator).to_have_attribute("data-state", "open")
    before = await bar_value(page, task_id)

    relay.stop(how)
    await expect(indicator).to_have_attribute("data-state", OUTAGE, timeout=10_000)
    await expect(indicator.locator(".conn-label")).not_to_have_text("Live")
    assert await task.get_attribute("data-status") == "running"

    await servers.relay(port, "--upstream", upstream, "--signing", "none")
    await expect(task).to_have_attribute("data-status", "succeeded", timeout=30_000)
    assert await bar_value(page, task_id) == 100 >= before
    log: list[str] = await page.evaluate("window.relayConnectionLog")
    outage = next(i for i, s in enumerate(log) if s in ("down", "reconnecting"))
    assert "open" in log[outage:], log
    assert await client_state(page, task_id) == await server_state(base, task_id)
    # It came back saying where it stood (a snapshot follows anyway: the new relay's
    # numbers start afresh), over either transport.
    assert any(position for position in positions[1:]), positions


@pytest.mark.timeout(90)
async def test_twelve_sse_tasks_on_one_page(servers: Servers, page: Page) -> None:
    """More tasks than the browser's six connections per origin: one multiplexed stream."""
    _, base = await servers.relay()
    streams = record_event_sources(page)
    await open_demo(page, base, transport="sse", duration="3", queue="1", fail="false")

    await start_button(page, 12).click()
    cards = page.locator("li.card")
    await expect(cards).to_have_count(12)
    await expect(page.locator('li.card[data-status="succeeded"]')).to_have_count(12, timeout=45_000)
    for bar in await page.get_by_role("progressbar").all():
        await expect(bar).to_have_attribute("aria-valuenow", "100")
    assert streams, "no EventSource was opened"
    assert all("/v1/events?" in url for url in streams), streams
    assert len(streams) <= 2, streams
    ids = [await c.get_attribute("data-task-id") for c in await cards.all()]
    for task_id in ids[:3]:
        assert task_id
        assert await client_state(page, task_id) == await server_state(base, task_id)


@pytest.mark.timeout(60)
async def test_screenshot_mid_progress(servers: Servers, page: Page) -> None:
    """A picture of the page with tasks in every state, for people to look at."""
    _, base = await servers.relay()
    await open_demo(page, base, transport="sse")
    done = await start_sim_task(base, duration=1, queue=0, fail=False)
    failed = await start_sim_task(base, duration=1.5, queue=0, fail=True)
    running = [await start_sim_task(base, duration=d, queue=0, fail=False) for d in (12, 16, 20)]
    waiting = await start_sim_task(base, duration=10, queue=30, fail=False)
    for task_id in (done, failed, *running, waiting, "no-such-task-42"):
        await watch(page, task_id)
    await page.locator("label[for=transport-ws]").click()
    await expect(page.get_by_role("radio", name="WebSocket")).to_be_checked()
    await start_button(page, 1).click()

    await expect(card(page, done)).to_have_attribute("data-status", "succeeded")
    await expect(card(page, failed)).to_have_attribute("data-status", "failed")
    await expect(card(page, waiting)).to_have_attribute("data-status", "waiting")
    await expect(page.locator('li.card[data-status="running"]')).to_have_count(4)
    await page.wait_for_function(
        "(id) => (window.relayStates[id]?.progress ?? 0) >= 0.3", arg=running[0], timeout=15_000
    )
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")

    await expect(card(page, "no-such-task-42").locator(".status-text")).to_have_text("Not found")
    await expect(card(page, waiting).locator(".queue")).to_have_text(re.compile(r"^Queue position"))

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "demo-mid-progress.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    await assert_summary_counts_badges(page)

    # A long node name wraps onto more lines instead of being cut.
    wrapped = await page.evaluate(
        """(id) => {
            const node = document.querySelector(`li.card[data-task-id="${id}"] .node`);
            const label = node.querySelector(".node-label");
            const lineHeight = node.getBoundingClientRect().height;
            label.textContent = "Failed in UltimateSDUpscaleWithControlNetTiledRefiner (custom)";
            return { fits: node.scrollWidth <= node.clientWidth,
                     lines: node.getBoundingClientRect().height / lineHeight };
        }""",
        running[0],
    )
    assert wrapped["fits"], wrapped
    assert wrapped["lines"] >= 2, wrapped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_unknown_and_invalid_task_ids(servers: Servers, page: Page, transport: str) -> None:
    """An unknown task is a final error: shown on its card, and no endless reconnects."""
    _, base = await servers.relay()
    streams = record_event_sources(page)
    await open_demo(page, base, transport=transport)

    await watch(page, "not a task!")
    await expect(page.locator("#watch-id")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#watch-hint")).to_contain_text("Not a task ID")
    await expect(page.locator("li.card")).to_have_count(0)

    await watch(page, "no-such-task-42")
    task = card(page, "no-such-task-42")
    await expect(task).to_have_attribute("data-status", "error")
    await expect(task).to_have_attribute("data-error-code", "task_not_found")
    await expect(task.locator(".status-text")).to_have_text("Not found")
    assert_sentence(await task.locator(".message").inner_text())
    await expect(task.locator(".node")).to_have_text("Unknown task")
    await expect(page.locator("#summary")).to_have_text("1 task · 1 not found")
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "idle", timeout=10_000
    )
    await asyncio.sleep(1.5)  # longer than a reconnect would wait
    assert len(streams) == (1 if transport == "sse" else 0), streams


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_upstream_outage_is_shown_and_recovers(
    servers: Servers, page: Page, transport: str
) -> None:
    _, base = await servers.relay()
    await open_demo(page, base, transport=transport)
    task_id = await start_sim_task(base, duration=5, queue=0, fail=False)
    await watch(page, task_id)
    task = card(page, task_id)
    await expect(task).to_have_attribute("data-status", "running")

    async with httpx.AsyncClient(timeout=5.0) as client:
        await client.post(f"{base}/sim/faults", json={"error_rate": 1})
        try:
            await expect(task.locator(".warning")).to_contain_text("retrying")
            await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        finally:
            await client.post(f"{base}/sim/faults", json={"error_rate": 0})
    await expect(task).to_have_attribute("data-status", "succeeded")
    await expect(task.locator(".warning")).to_be_hidden()
    assert await client_state(page, task_id) == await server_state(base, task_id)


@pytest.mark.timeout(90)
async def test_sse_tasks_coming_and_going(servers: Servers, page: Page) -> None:
    """The multiplexed stream is re-opened as tasks are added and removed."""
    _, base = await servers.relay()
    streams = record_event_sources(page)
    await open_demo(page, base, transport="sse", duration="4", queue="0", fail="false")
    await start_button(page, 1).click()
    await expect(page.locator('li.card[data-status="running"]')).to_have_count(1)
    await start_button(page, 5).click()
    await expect(page.locator('li.card[data-status="running"]')).to_have_count(6)

    ids = [await c.get_attribute("data-task-id") for c in await page.locator("li.card").all()]
    dropped = ids[0]
    assert dropped
    await card(page, dropped).get_by_role("button", name=re.compile("Stop watching")).click()
    await expect(card(page, dropped)).to_have_count(0)

    await expect(page.locator('li.card[data-status="succeeded"]')).to_have_count(5)
    await expect(page.locator("li.card")).to_have_count(5)
    for task_id in ids[1:]:
        assert task_id
        assert await client_state(page, task_id) == await server_state(base, task_id)
    # one task alone, then six together, then five: three streams, one at a time
    assert "/v1/tasks/" in streams[0], streams
    assert all("/v1/events?" in url for url in streams[1:]), streams
    assert len(streams) == 3, streams
    assert streams[-1].count("taskId=") == 5, streams
    # Each re-opened stream resumes the tasks the page holds, so they get patches.
    query = parse_qs(urlsplit(streams[-1]).query)
    assert set(parse_stream_id(query["lastEventId"][0])) == set(ids[1:]), streams


@pytest.mark.timeout(60)
async def test_merge_patch_in_the_browser(servers: Servers, page: Page) -> None:
    """relay-client.js applies RFC 7396 exactly, without touching its input."""
    _, base = await servers.relay()
    await page.goto(f"{base}/static/relay-client.js")  # same origin for the import
    results = await page.evaluate(
        """async (cases) => {
            const { applyMergePatch } = await import("/static/relay-client.js");
            return cases.map(([target, patch]) => {
                const before = JSON.stringify(target);
                const result = applyMergePatch(target, patch);
                return [result === undefined ? null : result, JSON.stringify(target) === before];
            });
        }""",
        [[target, patch] for target, patch, _ in RFC7396],
    )
    for (target, patch, expected), (result, untouched) in zip(RFC7396, results, strict=True):
        assert result == expected, (target, patch)
        assert untouched, (target, patch)
    polluted = await page.evaluate(
        """async () => {
            const { applyMergePatch } = await import("/static/relay-client.js");
            const out = applyMergePatch({}, JSON.parse('{"__proto__": {"polluted": 1}}'));
            return [({}).polluted ?? null, Object.getPrototypeOf(out) === Object.prototype,
                    JSON.stringify(out)];
        }"""
    )
    assert polluted == [None, True, '{"__proto__":{"polluted":1}}']


TOKEN_SECRET = "browser-tests-secret-0123456789abcdef"


def mint_token(*task_ids: str) -> str:
    env = {**os.environ, "RELAY_TOKEN_SECRET": TOKEN_SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "relay", "token", *task_ids, "--ttl", "120"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_access_tokens(servers: Servers, page: Page, transport: str) -> None:
    """With tokens on, the page's token opens its tasks; a refusal is final, not retried."""
    _, base = await servers.relay(None, env={"RELAY_TOKEN_SECRET": TOKEN_SECRET})
    allowed = await start_sim_task(base, duration=1.5, queue=0, fail=False)
    other = await start_sim_task(base, duration=1.5, queue=0, fail=False)
    streams = record_event_sources(page)
    await open_demo(page, base, transport=transport, token=mint_token(allowed))

    await watch(page, allowed)
    await expect(card(page, allowed)).to_have_attribute("data-status", "succeeded")
    await watch(page, other)
    await expect(card(page, other)).to_have_attribute("data-status", "error")
    await expect(card(page, other)).to_have_attribute("data-error-code", "unauthorized")
    await expect(card(page, other).locator(".status-text")).to_have_text("Refused")
    assert_sentence(await card(page, other).locator(".message").inner_text())
    await expect(page.locator("#connection")).to_have_attribute(
        "data-state", "idle", timeout=10_000
    )
    count = len(streams)
    await asyncio.sleep(1.5)  # longer than a reconnect would wait
    assert len(streams) == count, streams


@pytest.mark.timeout(60)
async def test_relay_with_a_lower_stream_cap(servers: Servers, page: Page) -> None:
    """A relay that allows fewer tasks per stream than the client's default: smaller streams."""
    _, base = await servers.relay(None, "--max-stream-tasks", "4")
    streams = record_event_sources(page)
    await open_demo(page, base, transport="sse", duration="2", queue="0", fail="false")
    await start_button(page, 5).click()
    await expect(page.locator('li.card[data-status="succeeded"]')).to_have_count(5)
    assert streams[0].count("taskId=") == 5, streams  # refused with 400 too_many_tasks
    assert all(url.count("taskId=") <= 4 for url in streams[1:]), streams


@pytest.mark.timeout(60)
async def test_tasks_succeed_unless_failures_are_asked_for(servers: Servers, page: Page) -> None:
    """A fresh page's tasks succeed; the visible Outcome control asks for failures."""
    _, base = await servers.relay()
    bodies: list[Any] = []
    page.on(
        "request",
        lambda request: (
            bodies.append(request.post_data_json) if request.url.endswith("/sim/tasks") else None
        ),
    )
    await open_demo(page, base, duration="2")
    outcome = page.get_by_label("Outcome")
    await expect(outcome).to_be_visible()  # not tucked away in "Simulation options"
    await expect(outcome).to_have_value("false")
    for count in (1, 5, 12):
        await expect(start_button(page, count)).to_have_text(f"Start {count}")

    await start_button(page, 5).click()
    await expect(page.locator("li.card")).to_have_count(5)
    assert bodies == [{"duration": 2, "fail": False}] * 5, bodies

    await outcome.select_option(label="Some fail, at random")
    await start_button(page, 1).click()
    await expect(page.locator("li.card")).to_have_count(6)
    assert bodies[-1] == {"duration": 2}, bodies  # the simulator's fail rate decides

    await outcome.select_option(label="All fail")
    await start_button(page, 1).click()
    await expect(page.locator("li.card")).to_have_count(7)
    assert bodies[-1] == {"duration": 2, "fail": True}, bodies

    cards = page.locator("li.card")
    await expect(cards.first).to_have_attribute("data-status", "failed")
    for first_five in (await cards.all())[2:]:
        await expect(first_five).to_have_attribute("data-status", "succeeded")


@pytest.mark.timeout(90)
async def test_queue_positions_count_down(servers: Servers, page: Page) -> None:
    """Tasks started together queue one behind the other, and each one's place counts down."""
    _, base = await servers.relay()
    await open_demo(page, base, transport="sse", duration="2")
    await start_button(page, 5).click()
    cards = page.locator("li.card")
    await expect(cards).to_have_count(5)
    ids = [await c.get_attribute("data-task-id") for c in await cards.all()]

    # Each task's places as the page saw them, until all of them run.
    seen: dict[str, list[int]] = {task_id: [] for task_id in ids if task_id}
    shot = False
    async with asyncio.timeout(30):
        while True:
            now = await page.evaluate(
                """(ids) => ids.map((id) => [
                    window.relayStates[id] ?? {},
                    document.querySelector(`li.card[data-task-id="${id}"] .queue`).textContent,
                ])""",
                list(seen),
            )
            for (state, text), places in zip(now, seen.values(), strict=True):
                if state.get("status") == "waiting":
                    place = state["lastQueueRemaining"]
                    assert text == f"Queue position {place}"
                    if not places or places[-1] != place:
                        places.append(place)
            if not shot and all(seen.values()):
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "demo-queue.png"), full_page=True)
                shot = True
            if all(state.get("status") not in (None, "waiting") for state, _ in now):
                break
            await asyncio.sleep(0.1)

    firsts = sorted(places[0] for places in seen.values() if places)
    assert len(set(firsts)) == len(firsts) >= 4, seen  # not all "Queue position 3"
    assert max(firsts) >= 4, seen
    for places in seen.values():
        assert places == sorted(places, reverse=True), seen  # never goes up
    assert any(len(places) >= 2 for places in seen.values()), seen  # and goes down
    await expect(page.locator('li.card[data-status="succeeded"]')).to_have_count(5)
    await assert_summary_counts_badges(page)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_indicator_goes_idle_when_nothing_is_watched(
    servers: Servers, page: Page, transport: str
) -> None:
    """Over either transport, the indicator is idle as soon as the last card goes."""
    _, base = await servers.relay()
    await open_demo(page, base, transport=transport)
    task_id = await start_sim_task(base, duration=30, queue=0, fail=False)
    await watch(page, task_id)
    await expect(card(page, task_id)).to_have_attribute("data-status", "running")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")

    # Read in the same turn as the click: no timer may be needed to get there.
    after = await page.evaluate(
        """() => {
            document.querySelector("li.card .remove-btn").click();
            const indicator = document.getElementById("connection");
            return [indicator.dataset.state, indicator.querySelector(".conn-detail").textContent];
        }"""
    )
    assert after == ["idle", "No subscriptions"], after


@pytest.mark.timeout(60)
async def test_one_line_subscribe_and_a_relay_client_of_ones_own(
    servers: Servers, page: Page
) -> None:
    """`subscribe()` still works alone; a RelayClient leaves its caller's options untouched."""
    _, base = await servers.relay(None, "--max-stream-tasks", "2")
    tasks = [await start_sim_task(base, duration=1.5, queue=0, fail=False) for _ in range(4)]
    await page.goto(f"{base}/static/relay-client.js")  # same origin for the import
    result = await page.evaluate(
        """async ([base, tasks]) => {
            const client = await import("/static/relay-client.js");
            const { subscribe, RelayClient, ConnectionState } = client;
            const follow = (sub, taskId, transport) => new Promise((resolve, reject) => {
                let last;
                sub(taskId, { transport, onState: (s) => (last = s), onEnd: () => resolve(last),
                              onError: (e) => reject(new Error(e.code)) });
            });
            const options = { maxTasksPerStream: 32 };
            const mine = new RelayClient(base, options);
            const states = await Promise.all([
                follow(subscribe, tasks[0], "sse"),
                follow(subscribe, tasks[1], "ws"),
                // Three tasks on one stream: above the relay's cap, so it is refused first.
                ...tasks.slice(1).map((id) => follow(mine.subscribe.bind(mine), id, "sse")),
            ]);
            return { states, options, frozen: Object.isFrozen(mine.options),
                     idle: mine.connectionState().state === ConnectionState.IDLE };
        }""",
        [base, tasks],
    )
    assert result["options"] == {"maxTasksPerStream": 32}
    assert result["frozen"] and result["idle"], result
    followed = [tasks[0], tasks[1], *tasks[1:]]
    for task_id, state in zip(followed, result["states"], strict=True):
        assert state == await server_state(base, task_id)
