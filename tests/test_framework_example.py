"""The React hook of examples/react/ in Chromium: subscribe on mount, stop on unmount.

The hook is transpiled by the TypeScript of tests/node and run against React's hooks from
preact/compat (the same API, and plain ES modules a browser loads through an import map:
no bundler), with relay-client.js as the relay serves it. test_client_package.py type-checks
the same file against @types/react under --strict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.async_api import Page, Route, expect

from . import test_browser
from .node_tools import ROOT, executable, node_tools, run
from .test_browser import Servers, start_sim_task

browser = test_browser.browser
page = test_browser.page
servers = test_browser.servers

EXAMPLE = ROOT / "examples" / "react" / "useTaskProgress.ts"
IMPORT_MAP = {
    "imports": {
        "react": "/vendor/preact/compat/dist/compat.mjs",
        "preact": "/vendor/preact/dist/preact.mjs",
        "preact/hooks": "/vendor/preact/hooks/dist/hooks.mjs",
        "comfy-relay-client": "/static/relay-client.js",
    }
}
APP = """
import { createElement as h, render } from "react";
import { RelayClient } from "comfy-relay-client";
import { useTaskProgress } from "/example/useTaskProgress.js";

const relay = new RelayClient(location.origin);
const root = document.body.appendChild(document.createElement("div"));
window.relay = relay;
window.rendered = [];

function Task({ taskId, transport }) {
  const { state, progress, ended, error } = useTaskProgress(relay, taskId, transport);
  window.rendered.push(progress);
  return h("p", {
    id: "task",
    "data-status": state?.status ?? "",
    "data-ended": String(ended),
    "data-error": error?.code ?? "",
  }, `${Math.floor(progress * 100)}%`);
}
window.mount = (taskId, transport) => render(h(Task, { taskId, transport }), root);
window.unmount = () => render(null, root);
document.documentElement.dataset.ready = "true";
"""
# Puts the import map and the app into a page the relay served: Chromium refuses loopback
# connections (Local Network Access) from a document that a test route made up.
START_APP = """([importMap, app]) => {
    const map = document.createElement("script");
    map.type = "importmap";
    map.textContent = JSON.stringify(importMap);
    document.head.append(map);
    const script = document.createElement("script");
    script.type = "module";
    script.textContent = app;
    document.head.append(script);
}"""


def transpile(source: Path) -> str:
    """TypeScript to JavaScript, types dropped, imports kept, as a bundler would."""
    typescript = node_tools() / "typescript"
    script = (
        f"const ts = require({json.dumps(str(typescript))});"
        "const source = require('fs').readFileSync(process.argv[1], 'utf8');"
        "const options = { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 };"
        "process.stdout.write(ts.transpileModule(source, { compilerOptions: options }).outputText);"
    )
    return run([executable("node"), "-e", script, str(source)], ROOT).stdout


async def open_example(page: Page, base: str) -> None:
    hook = transpile(EXAMPLE)
    vendor = node_tools() / "preact"

    async def serve(route: Route) -> None:
        path = route.request.url.removeprefix(base)
        if path == "/example/useTaskProgress.js":
            await route.fulfill(body=hook, content_type="text/javascript")
        else:
            file = vendor / path.removeprefix("/vendor/preact/")
            await route.fulfill(path=str(file), content_type="text/javascript")

    await page.route(f"{base}/example/**", serve)
    await page.route(f"{base}/vendor/preact/**", serve)
    await page.goto(f"{base}/static/relay-client.js")  # a page of the relay's origin
    await page.evaluate(START_APP, [IMPORT_MAP, APP])
    await expect(page.locator("html")).to_have_attribute("data-ready", "true")


async def mount(page: Page, task_id: str, transport: str) -> None:
    """Render the component for a task: a first mount, or new props for the mounted one."""
    await page.evaluate("([id, transport]) => window.mount(id, transport)", [task_id, transport])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_hook_subscribes_on_mount_and_stops_on_unmount(
    servers: Servers, page: Page, transport: str
) -> None:
    _, base = await servers.relay()
    await open_example(page, base)
    task = page.locator("#task")

    # Mounted: it follows the task. Unmounted: the subscription is gone.
    long_task = await start_sim_task(base, duration=30, queue=0, fail=False)
    await mount(page, long_task, transport)
    await expect(task).to_have_attribute("data-status", "running")
    await page.wait_for_function("window.relay.connectionState().state === 'open'")
    await page.evaluate("window.unmount()")
    await expect(task).to_have_count(0)
    # Frameworks run an unmounted component's effect cleanups soon after, not during, render.
    await page.wait_for_function("!window.relay.busy", timeout=2000)
    assert await page.evaluate("window.relay.connectionState().state") == "idle"
    rendered = await page.evaluate("window.rendered.length")
    await page.wait_for_timeout(500)
    assert await page.evaluate("window.rendered.length") == rendered, "rendered after unmount"

    # Followed to its end: the bar at 100 %.
    await page.evaluate("window.rendered = []")
    short_task = await start_sim_task(base, duration=2, queue=0, fail=False)
    await mount(page, short_task, transport)
    await expect(task).to_have_attribute("data-ended", "true", timeout=20_000)
    await expect(task).to_have_attribute("data-status", "succeeded")
    await expect(task).to_have_text("100%")
    values = await page.evaluate("window.rendered")
    assert values == sorted(values) and values[-1] == 1

    # Another task ID on the same component: the old subscription ends, a new one starts.
    await mount(page, "no-such-task", transport)
    await expect(task).to_have_attribute("data-error", "task_not_found")
    await expect(task).to_have_attribute("data-ended", "true")
