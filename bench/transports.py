"""Upstream client CPU per request, httpx on each transport tried beside plain aiohttp.

Every client runs in a child process of its own and POSTs the progress call
(`{"taskId": ...}`, read whole, parsed with `json.loads`) to one raw upstream
(`bench/fixed_upstream.py --raw`), `--concurrency` requests in flight, for `--seconds`
after a warm-up. Its CPU time (user + system, from /proc/<pid>/stat) over the requests it
completed is the figure; the clients take turns, round after round, so that a busy
neighbour weighs on all of them alike, and the table gives median (min-max) over rounds.

Clients (`--clients`, comma separated):

- `aiohttp`: a plain `aiohttp.ClientSession`, the floor;
- `httpx-httpcore`: httpx's own transport (httpcore's pool), sniffio installed;
- `httpx-httpcore-nosniffio`: the same with `import sniffio` failing, as on an install
  where nothing pulls sniffio in (anyio 4.16 no longer does): httpcore retries that
  import at every lock, event and shield it sets up;
- `httpx-aiohttp`: httpx over `httpx_aiohttp.AiohttpTransport` (the httpx-aiohttp package);
- `httpx-upstream`: httpx over the relay's `UpstreamTransport`, through `AsyncClient.post`;
- `upstream-direct`: an `httpx.Request` handed straight to `UpstreamTransport`, as the
  relay's `UpstreamClient` sends (no cookie jar, auth flow, redirects or hooks);
- `relay-call`: the relay's whole `UpstreamClient.progress` on `make_http_client()` (slot,
  AccessKey signing, the request, strict JSON and envelope reading).

Every httpx client above sends with `AsyncClient.post` but the last two.

bench.economy runs `aiohttp` paced instead (`--child aiohttp --paced TASKS --interval S`):
as many tasks as the relay polls, each every interval (±10%), its floor in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import importlib.machinery
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from .common import PYTHON, ROOT, Server, command_line, cpu_seconds, emit, free_port, log, table

CLIENTS = (
    "aiohttp",
    "httpx-httpcore-nosniffio",
    "httpx-httpcore",
    "httpx-aiohttp",
    "httpx-upstream",
    "upstream-direct",
    "relay-call",
)
PATH = "/scc/comfy_get_progress"


class NoSniffio(importlib.abc.MetaPathFinder):
    """`import sniffio` fails after the same search of sys.path a missing module costs."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "sniffio":
            return None
        importlib.machinery.PathFinder.find_spec("sniffio_is_not_installed", path)
        raise ModuleNotFoundError("No module named 'sniffio'", name="sniffio")


def hide_sniffio() -> None:
    """Make `import sniffio` fail in this process, as on an install without it."""
    for name in [m for m in sys.modules if m == "sniffio" or m.startswith("sniffio.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, NoSniffio())


async def run_client(kind: str, url: str, concurrency: int, warmup: float, seconds: float) -> Any:
    """Requests as fast as `concurrency` workers go; CPU and count over the measured part."""
    body_of = [json.dumps({"taskId": f"t{i}"}).encode() for i in range(concurrency)]
    headers = {"Content-Type": "application/json; charset=utf-8"}
    close: Any
    if kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

        async def call(i: int) -> Any:
            async with session.post(url + PATH, data=body_of[i], headers=headers) as response:
                return json.loads(await response.read())

        close = session.close
    elif kind == "relay-call":
        from relay.upstream.signing import ApiGatewaySigner
        from relay.upstream import UpstreamClient, make_http_client

        http = make_http_client(10.0, concurrency)
        upstream = UpstreamClient(http, url, ApiGatewaySigner("bench", "secret"), concurrency)
        task_ids = [f"t{i}" for i in range(concurrency)]

        async def call(i: int) -> Any:
            return await upstream.progress(task_ids[i])

        close = http.aclose
    elif kind == "upstream-direct":
        import httpx

        from relay.upstream.transport import UpstreamTransport

        direct = UpstreamTransport(max_connections=concurrency)
        target = httpx.URL(url + PATH)
        timeouts = httpx.Timeout(10.0).as_dict()

        async def call(i: int) -> Any:
            extensions = {"timeout": timeouts}
            request = httpx.Request(
                "POST", target, content=body_of[i], headers=headers, extensions=extensions
            )
            response = await direct.handle_async_request(request)
            try:
                return json.loads(await response.aread())
            finally:
                await response.aclose()

        close = direct.aclose
    else:
        import httpx

        from relay.upstream.transport import UpstreamTransport

        transport: httpx.AsyncBaseTransport
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        if kind.startswith("httpx-httpcore"):
            transport = httpx.AsyncHTTPTransport(limits=limits)
        elif kind == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        else:
            transport = UpstreamTransport(max_connections=concurrency)
        http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0))

        async def call(i: int) -> Any:
            response = await http.post(url + PATH, content=body_of[i], headers=headers)
            return json.loads(response.content)

        close = http.aclose
    done = 0
    stop = False

    async def worker(i: int) -> None:
        nonlocal done
        while not stop:
            await call(i)
            done += 1

    workers = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    c0, n0, t0 = cpu_seconds(os.getpid()), done, time.monotonic()
    await asyncio.sleep(seconds)
    c1, n1, t1 = cpu_seconds(os.getpid()), done, time.monotonic()
    stop = True
    await asyncio.gather(*workers, return_exceptions=True)
    await close()
    return {"client": kind, "requests": n1 - n0, "cpu": c1 - c0, "wall": t1 - t0}


async def run_paced(url: str, tasks: int, interval: float, concurrency: int, seconds: float) -> Any:
    """Plain aiohttp polling `tasks` tasks every `interval` (±10%), as the relay paces its
    calls, at most `concurrency` in flight: bench.economy's floor for the same load."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    headers = {"Content-Type": "application/json; charset=utf-8"}
    slots = asyncio.Semaphore(concurrency)
    rng = random.Random(1)
    done = 0
    stop = False

    async def poll(i: int) -> None:
        nonlocal done
        body = json.dumps({"taskId": f"paced-{i}"}).encode()
        await asyncio.sleep(rng.uniform(0, interval))
        while not stop:
            async with slots, session.post(url + PATH, data=body, headers=headers) as response:
                json.loads(await response.read())
            done += 1
            await asyncio.sleep(interval * rng.uniform(0.9, 1.1))

    loops = [asyncio.ensure_future(poll(i)) for i in range(tasks)]
    await asyncio.sleep(interval + 2.0)
    c0, n0, t0 = cpu_seconds(os.getpid()), done, time.monotonic()
    await asyncio.sleep(seconds)
    c1, n1, t1 = cpu_seconds(os.getpid()), done, time.monotonic()
    stop = True
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await session.close()
    return {"client": "aiohttp-paced", "requests": n1 - n0, "cpu": c1 - c0, "wall": t1 - t0}


def child(args: argparse.Namespace) -> None:
    if args.child == "httpx-httpcore-nosniffio":
        hide_sniffio()
    import uvloop

    if args.paced:
        work = run_paced(args.url, args.paced, args.interval, args.concurrency, args.seconds)
    else:
        work = run_client(args.child, args.url, args.concurrency, 1.0, args.seconds)
    print(json.dumps(uvloop.run(work)), flush=True)


def measure(kind: str, url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.transports", "--child", kind, "--url", url]
    argv += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=seconds + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default=",".join(CLIENTS), help="which clients, in order")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every client")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paced", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    kinds = [k for k in args.clients.split(",") if k]
    for kind in kinds:
        if kind not in CLIENTS:
            raise SystemExit(f"unknown client {kind!r}: one of {', '.join(CLIENTS)}")
    command = command_line()
    port = free_port()
    upstream = Server(
        "raw-upstream",
        [PYTHON, "-m", "bench.fixed_upstream", "--port", str(port), "--raw"],
        port,
        "/healthz",
    )
    per_call: dict[str, list[float]] = {k: [] for k in kinds}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    upstream_cpu: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for round_no in range(args.rounds):
            for kind in kinds:
                u0 = cpu_seconds(upstream.pid)
                result = measure(kind, upstream.url, args.concurrency, args.seconds)
                u1 = cpu_seconds(upstream.pid)
                n = max(result["requests"], 1)
                per_call[kind].append(result["cpu"] / n * 1000)
                rates[kind].append(n / result["wall"])
                # The upstream's CPU covers the client's warm-up too: an upper bound.
                upstream_cpu[kind].append((u1 - u0) / n * 1000)
                log(
                    f"round {round_no + 1} {kind}: {per_call[kind][-1]:.3f} ms/request, "
                    f"{rates[kind][-1]:,.0f} requests/s"
                )
    finally:
        upstream.stop()
    floor = statistics.median(per_call["aiohttp"]) if "aiohttp" in per_call else None
    rows = []
    for kind in kinds:
        values = per_call[kind]
        med = statistics.median(values)
        ratio = f"{med / floor:.2f}x" if floor else "-"
        rows.append(
            [
                f"`{kind}`",
                f"{med:.3f} ({min(values):.3f}-{max(values):.3f})",
                f"{statistics.median(rates[kind]):,.0f}",
                ratio,
            ]
        )
    body = table(
        ["client", "client CPU ms / request, median (min-max)", "requests / s", "vs aiohttp"],
        rows,
    )
    body += (
        f"\n\n{args.concurrency} requests in flight, {args.seconds:g} s measured per run after a"
        f" 1 s warm-up, {args.rounds} rounds, clients in turn; upstream"
        " `bench/fixed_upstream.py --raw`."
    )
    emit("Upstream client CPU per request, by transport", command, body)


if __name__ == "__main__":
    main()
