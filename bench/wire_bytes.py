"""Bytes on the wire per update: merge patches against sending the full state every time.

Simulated tasks as the simulator makes them by default (3 s in the queue, 20 s running,
plus one that fails part-way), polled every second by a relay, are recorded over SSE and
over WebSocket from start to `end`. Every patch is applied to rebuild the state it leads
to; that state, sent whole, is what the full-state alternative would have sent instead.
Counted per update: the JSON `data`, the whole event or message, and the whole event plus
its framing (SSE: the HTTP/1.1 chunk header and trailer around each event; WebSocket: the
frame header). The first snapshot and the `end` are the same either way and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
import httpx

from relay.patch import apply_patch

from .common import (
    command_line,
    emit,
    http_json,
    log,
    start_relay,
    start_simulator,
    summary,
    table,
)

TARGET = 1 / 3


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def chunk_overhead(size: int) -> int:
    """HTTP/1.1 chunked encoding around one chunk: hex length, CRLF, CRLF."""
    return len(f"{size:x}") + 4


def ws_overhead(size: int) -> int:
    """A server-to-client (unmasked) WebSocket frame header."""
    return 2 if size < 126 else 4 if size < 65536 else 10


async def record_sse(url: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("GET", url) as response,
    ):
        buffer = ""
        async for text in response.aiter_text():
            buffer += text.replace("\r\n", "\n")
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                pairs = (line.split(": ", 1) for line in block.split("\n"))
                fields = {pair[0]: pair[1] for pair in pairs if len(pair) == 2 and pair[0]}
                if "data" in fields:
                    events.append(fields)
    return events


async def record_ws(url: str, task_id: str) -> list[dict[str, Any]]:
    messages = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(dumps({"type": "subscribe", "taskId": task_id}))
        async for message in ws:
            messages.append(json.loads(message.data))
            if messages[-1]["type"] in ("end", "error"):
                break
    return messages


def measure_sse(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {k: [] for k in ("patch", "full", "pf", "ff", "pw", "fw")}
    state: Any = None
    for e in events:
        data = json.loads(e["data"])
        if e["event"] == "snapshot":
            state = data
        elif e["event"] == "patch":
            state = apply_patch(state, data)
            full = dumps(state)
            patch_frame = f"id: {e['id']}\nevent: patch\ndata: {e['data']}\n\n".encode()
            full_frame = f"id: {e['id']}\nevent: snapshot\ndata: {full}\n\n".encode()
            sizes["patch"].append(len(e["data"].encode()))
            sizes["full"].append(len(full.encode()))
            sizes["pf"].append(len(patch_frame))
            sizes["ff"].append(len(full_frame))
            sizes["pw"].append(len(patch_frame) + chunk_overhead(len(patch_frame)))
            sizes["fw"].append(len(full_frame) + chunk_overhead(len(full_frame)))
    return sizes


def measure_ws(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {k: [] for k in ("patch", "full", "pf", "ff", "pw", "fw")}
    state: Any = None
    for m in messages:
        if m["type"] == "snapshot":
            state = m["data"]
        elif m["type"] == "patch":
            state = apply_patch(state, m["data"])
            patch_msg = dumps(m).encode()
            full_msg = dumps({**m, "type": "snapshot", "data": state}).encode()
            sizes["patch"].append(len(dumps(m["data"]).encode()))
            sizes["full"].append(len(dumps(state).encode()))
            sizes["pf"].append(len(patch_msg))
            sizes["ff"].append(len(full_msg))
            sizes["pw"].append(len(patch_msg) + ws_overhead(len(patch_msg)))
            sizes["fw"].append(len(full_msg) + ws_overhead(len(full_msg)))
    return sizes


def typical(patches: list[int], fulls: list[int]) -> float:
    """The ratio for the median update (a step within a node, not a node change or the end)."""
    return statistics.median(p / f for p, f in zip(patches, fulls, strict=True))


async def record_all(relay_url: str, ws_url: str, tasks: list[str]) -> list[Any]:
    jobs = [record_sse(f"{relay_url}/v1/tasks/{t}/events") for t in tasks]
    jobs += [record_ws(ws_url + "/v1/ws", t) for t in tasks]
    return list(await asyncio.gather(*jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3, help="succeeding tasks (one more fails)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each task runs")
    parser.add_argument("--quick", action="store_true", help="same as the default (about 25 s)")
    args = parser.parse_args()
    sim = start_simulator()
    relay = start_relay(sim.url, 1.0)
    try:
        specs = [{"queue": 3, "duration": args.duration, "fail": False}] * args.tasks
        specs.append({"queue": 3, "duration": args.duration, "fail": True})
        tasks = [http_json("POST", sim.url + "/sim/tasks", s)["taskId"] for s in specs]
        started = time.monotonic()
        recorded = asyncio.run(record_all(relay.url, relay.ws_url, tasks))
        log(f"wire bytes: {len(tasks)} tasks recorded in {time.monotonic() - started:.1f} s")
    finally:
        relay.stop()
        sim.stop()
    per_transport = {
        "SSE": [measure_sse(r) for r in recorded[: len(tasks)]],
        "WebSocket": [measure_ws(r) for r in recorded[len(tasks) :]],
    }
    rows = []
    for transport, runs in per_transport.items():
        for label, p, f in (
            ("JSON data", "patch", "full"),
            ("event / message", "pf", "ff"),
            ("with framing", "pw", "fw"),
        ):
            ratios = [sum(r[p]) / sum(r[f]) for r in runs]
            med = statistics.median(ratios)
            verdict = "met" if med <= TARGET else "missed"
            rows.append(
                [
                    transport,
                    label,
                    summary((statistics.mean(r[p]) for r in runs), 1),
                    summary((statistics.mean(r[f]) for r in runs), 1),
                    f"**{med:.3f}** (1/{1 / med:.1f}) {verdict}"
                    + (f", tasks {summary(ratios, 3)}" if len(ratios) > 1 else ""),
                    summary((typical(r[p], r[f]) for r in runs), 3),
                ]
            )
    updates = [len(r["patch"]) for r in per_transport["SSE"]]
    body = table(
        [
            "transport",
            "counted",
            "bytes / update, patch",
            "bytes / update, full state",
            "patch / full (total bytes)",
            "patch / full, median update",
        ],
        rows,
    )
    body += (
        f"\n\n{len(tasks)} tasks ({args.tasks} succeed, 1 fails), {summary(updates, 0)} updates "
        f"each, median (min-max) over tasks; poll interval 1 s."
    )
    emit("Bytes on the wire per update", command_line(), body)


if __name__ == "__main__":
    main()
