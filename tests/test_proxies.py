"""The proxy recipes of docs/operations.md, run: Debian's nginx and Caddy in front of a relay.

The configurations are read from the document's `nginx` and `caddyfile` blocks, with only
the ports changed, so the recipes cannot drift from what is tried here. Through each proxy:
an SSE stream's events and keep-alive comments arrive as the relay sends them (not held
back), a WebSocket upgrades and follows a task, and a foreign page's upgrade is still
refused (the proxy kept the browser's Host, port included).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from .clients import recv_json
from .conftest import RelayFactory, SimulatedUpstream
from .servers import ROOT, ThreadServer, free_port

OPERATIONS = ROOT / "docs" / "operations.md"
PING_INTERVAL = 0.3


def recipe(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", OPERATIONS.read_text(), re.S)
    assert len(blocks) == 1, f"one {language} block in docs/operations.md"
    return str(blocks[0])


def nginx_config(directory: Path, relay_port: int, port: int) -> str:
    server = recipe("nginx").replace("listen 8080;", f"listen 127.0.0.1:{port};")
    server = server.replace("127.0.0.1:8000", f"127.0.0.1:{relay_port}")
    temp = " ".join(
        f"{kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as `nobody`, who cannot enter pytest's directories.
    user = "user root;" if os.geteuid() == 0 else ""
    return (
        f"{user} worker_processes 1; pid {directory / 'nginx.pid'};"
        f" error_log {directory / 'error.log'} warn;"
        " events { worker_connections 256; }"
        f" http {{ access_log off; {temp}\n{server}\n}}\n"
    )


def caddy_config(relay_port: int, port: int) -> str:
    site = recipe("caddyfile").replace(":8080 {", f"http://127.0.0.1:{port} {{")
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{relay_port}")
    return "{\n\tadmin off\n\tauto_https off\n}\n\n" + site


def program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(f"{name} is missing: apt-get install -y {name} (as .ci/run does)")
    return found


def start_proxy(
    kind: str, relay: ThreadServer, directory: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = (directory / f"{kind}.log").open("wb")
    if kind == "nginx":
        config = directory / "nginx.conf"
        config.write_text(nginx_config(directory, relay.port, port))
        command = [program("nginx"), "-e", str(directory / "error.log"), "-p", str(directory)]
        command += ["-c", str(config), "-g", "daemon off;"]
        env = None
    else:
        config = directory / "Caddyfile"
        config.write_text(caddy_config(relay.port, port))
        command = [program("caddy"), "run", "--config", str(config), "--adapter", "caddyfile"]
        env = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory / "data")}
        env["XDG_CONFIG_HOME"] = str(directory / "config")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{kind} exited: {(directory / f'{kind}.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"{kind} did not start: {(directory / f'{kind}.log').read_text()}")


@pytest.fixture(params=["nginx", "caddy"])
def proxied(
    request: pytest.FixtureRequest, make_relay: RelayFactory, tmp_path: Path
) -> Iterator[tuple[ThreadServer, int]]:
    """A relay, and the port of a proxy in front of it."""
    relay = make_relay(ping_interval=PING_INTERVAL)
    process, port = start_proxy(request.param, relay, tmp_path)
    yield relay, port
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


async def test_sse_events_and_pings_arrive_as_they_are_sent(
    proxied: tuple[ThreadServer, int], upstream: SimulatedUpstream
) -> None:
    """A task that waits 0.8 s (an idle stream: keep-alive comments), then runs 0.6 s."""
    _, port = proxied
    task_id = upstream.start_task(queue=0.8, duration=0.6)
    arrivals: list[tuple[float, str]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        start = time.monotonic()
        url = f"http://127.0.0.1:{port}/v1/tasks/{task_id}/events"
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                arrivals.append((time.monotonic() - start, line))
    seen = {line: at for at, line in reversed(arrivals)}  # each line's first arrival
    snapshot, patch, end = seen["event: snapshot"], seen["event: patch"], seen["event: end"]
    pings = [at for at, line in arrivals if line == ": ping" and snapshot < at < patch]
    assert snapshot < 0.5, arrivals
    assert len(pings) >= 1, arrivals  # the idle stream's keep-alive came through, on time
    assert patch - snapshot > 0.5 and end - snapshot > 0.9, arrivals


async def test_websockets_upgrade_and_the_origin_check_holds(
    proxied: tuple[ThreadServer, int], upstream: SimulatedUpstream
) -> None:
    _, port = proxied
    task_id = upstream.start_task(queue=0.1, duration=0.4)
    url, origin = f"ws://127.0.0.1:{port}/v1/ws", f"http://127.0.0.1:{port}"
    async with websockets.connect(url, origin=websockets.Origin(origin)) as ws:
        await ws.send(f'{{"type": "subscribe", "taskId": "{task_id}"}}')
        kinds = []
        while not kinds or kinds[-1] != "end":
            kinds.append((await recv_json(ws, timeout=5))["type"])
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(url, origin=websockets.Origin("http://evil.example")):
            pass
    assert refused.value.response.status_code == 403
