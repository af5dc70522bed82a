"""Load client: many SSE or WebSocket subscribers in one process, driven over stdin/stdout.

SSE connections are raw asyncio streams (`asyncio.open_connection`): one GET, then the body
is only scanned for `data:` lines, which is as cheap as a load client gets in Python.
WebSocket connections use aiohttp's client, and subscribe with a message unless the path names
the task (`{task}`, as nginx + nchan takes it). With `--latency`, every event's `sentAt` field
(the upstream's send time, `time.time()`) is compared with the time the read returned.

Commands, one per line on stdin, each answered by one JSON line on stdout:
`stats` (counters and this process's CPU time), `reset` (forget latency samples),
`lat` (latency samples in ms, and per update, keyed "taskId sentAt", the count and slowest
delivery), `quit`.
The process also quits when stdin closes or after `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

DATA = b"\ndata:"
SENT_AT = b'"sentAt":'


class Counters:
    def __init__(self) -> None:
        self.ready = 0
        self.failed = 0
        self.closed = 0
        self.events = 0
        self.bytes = 0
        self.samples: list[float] = []
        self.updates: dict[str, list[float]] = {}

    def latency(self, task_id: str, stamp: str, now: float) -> None:
        """One delivery of the update stamped `stamp`; updates are told apart per task."""
        try:
            late = (now - float(stamp)) * 1000.0
        except ValueError:
            return
        self.samples.append(late)
        key = f"{task_id} {stamp}"
        update = self.updates.get(key)
        if update is None:
            self.updates[key] = [1, late]
        else:
            update[0] += 1
            if late > update[1]:
                update[1] = late


def sent_at(text: str, start: int = 0) -> str | None:
    i = text.find('"sentAt":', start)
    if i < 0:
        return None
    i += 9
    j = i
    while j < len(text) and text[j] not in ",}":
        j += 1
    return text[i:j]


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.counters = Counters()
        self.connect_slots = asyncio.Semaphore(args.concurrency)
        self.session: aiohttp.ClientSession | None = None

    async def sse(self, task_id: str) -> None:
        c = self.counters
        path = self.args.path.format(task=task_id)
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        ready = False
        await self.connect_slots.acquire()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 30
            )
        except (OSError, TimeoutError):
            c.failed += 1
            self.connect_slots.release()
            return
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                return
            latency = self.args.latency
            carry = b""
            partial = b""
            while True:
                chunk = await reader.read(262144)
                if not chunk:
                    break
                now = time.time()
                c.bytes += len(chunk)
                if latency:
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    found = 0
                    for line in lines:
                        if line.startswith(b"data:"):
                            found += 1
                            i = line.find(SENT_AT)
                            if i >= 0:
                                stamp = sent_at(line[i:].decode())
                                if stamp is not None:
                                    c.latency(task_id, stamp, now)
                else:
                    scanned = carry + chunk
                    found = scanned.count(DATA)
                    carry = scanned[-5:]
                c.events += found
                if found and not ready:
                    ready = True
                    c.ready += 1
                    self.connect_slots.release()
            if ready:
                c.closed += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            if ready:
                c.closed += 1
        finally:
            if not ready:
                c.failed += 1
                self.connect_slots.release()
            writer.close()

    async def ws(self, task_id: str) -> None:
        c = self.counters
        assert self.session is not None
        ready = False
        await self.connect_slots.acquire()
        try:
            ws = await self.session.ws_connect(
                self.args.url.replace("http", "ws", 1) + self.args.path.format(task=task_id),
                max_msg_size=1 << 20,
                autoping=True,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            c.failed += 1
            self.connect_slots.release()
            return
        try:
            if "{task}" not in self.args.path:  # else the URL names the task (nchan)
                await ws.send_str(json.dumps({"type": "subscribe", "taskId": task_id}))
            latency = self.args.latency
            async for message in ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    break
                now = time.time()
                text: str = message.data
                c.events += 1
                c.bytes += len(text)
                if latency:
                    stamp = sent_at(text)
                    if stamp is not None:
                        c.latency(task_id, stamp, now)
                if not ready:
                    ready = True
                    c.ready += 1
                    self.connect_slots.release()
                if text.startswith('{"type":"end"'):
                    break
            if ready:
                c.closed += 1
        except (aiohttp.ClientError, OSError):
            if ready:
                c.closed += 1
        finally:
            if not ready:
                c.failed += 1
                self.connect_slots.release()
            with contextlib.suppress(Exception):
                await ws.close()

    def answer(self, command: str) -> dict[str, Any]:
        c = self.counters
        if command == "stats":
            times = os.times()
            return {
                "t": time.time(),
                "ready": c.ready,
                "failed": c.failed,
                "closed": c.closed,
                "events": c.events,
                "bytes": c.bytes,
                "cpu": times.user + times.system,
            }
        if command == "reset":
            c.samples = []
            c.updates = {}
            return {"ok": True}
        if command == "lat":
            return {"samples": [round(s, 3) for s in c.samples], "updates": c.updates}
        return {"error": f"unknown command {command!r}"}

    async def run(self) -> None:
        spec: list[list[Any]] = json.loads(self.args.spec)
        # Round-robin over tasks, so every task has its first subscriber early.
        order: list[str] = []
        left = {task: count for task, count in spec}
        while left:
            for task in list(left):
                order.append(task)
                left[task] -= 1
                if not left[task]:
                    del left[task]
        if self.args.transport == "ws":
            connector = aiohttp.TCPConnector(limit=0, force_close=True)
            self.session = aiohttp.ClientSession(connector=connector)
            connect = self.ws
        else:
            connect = self.sse
        conns = [asyncio.create_task(connect(task)) for task in order]
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        try:
            async with asyncio.timeout(self.args.max_seconds):
                while True:
                    line = await stdin.readline()
                    command = line.decode().strip()
                    if not line or command == "quit":
                        break
                    sys.stdout.write(json.dumps(self.answer(command)) + "\n")
                    sys.stdout.flush()
        except TimeoutError:
            print("load client: --max-seconds reached, quitting", file=sys.stderr)
        for conn in conns:
            conn.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        sys.stdout.write(json.dumps({"ok": True}) + "\n")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="server base URL, http://127.0.0.1:PORT")
    parser.add_argument("--transport", choices=["sse", "ws"], default="sse")
    parser.add_argument("--path", default="/v1/tasks/{task}/events", help="SSE path template")
    parser.add_argument("--spec", required=True, help='JSON [["taskId", subscribers], ...]')
    parser.add_argument("--latency", action="store_true", help="record sentAt latencies")
    parser.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load is only ever sent to loopback")
    if args.transport == "ws" and args.path == "/v1/tasks/{task}/events":
        args.path = "/v1/ws"
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(Client(args).run())


def loop_factory() -> Any:
    """uvloop when installed (uvicorn uses it too), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
