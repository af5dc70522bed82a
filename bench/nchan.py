"""nginx with the nchan module: the comparison row for the physical limit of this job.

nchan fans a published message out to its subscribers in C, from nginx's event loop, with
no interpreter in the way: what a push server on this machine can do at best. Debian
packages it (`apt-get install nginx-light libnginx-mod-nchan`); where it is not installed
the benchmarks leave the row out.

`start_nchan(interval, transport)` runs `nginx` (one worker, as the relay is one process)
with a config written to a temporary directory, and a publisher process that POSTs the
frame the minimal server would push to nginx's publisher location every `interval`
seconds (the same patch, with a fresh `sentAt`); `interval` 0 publishes one message and
stops, for idle subscribers. Subscribers are served the newest message when they connect
(a snapshot of sorts), then every new one:

- SSE: `GET /v1/tasks/{task}/events` (`nchan_subscriber eventsource`, pings every 15 s);
- WebSocket: `WS /ws/{task}` (`nchan_subscriber websocket`; what the client sends is ignored).

Its CPU time is the master's and the worker's together (/proc), its memory their RSS.

    python -m bench.nchan publish --url URL --task hot --transport sse --interval 0.1
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from .common import HOST, LOG_DIR, PYTHON, Proc, Server, cpu_seconds, free_port, hot_patch, rss_kib

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
TASK_ID = "hot"

CONFIG = """
load_module {module};
worker_processes 1;
worker_rlimit_nofile 19500;
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        location = /healthz {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location ~ ^/v1/tasks/([A-Za-z0-9_-]+)/events$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message oldest;
            nchan_eventsource_ping_interval 15;
        }}
        location ~ ^/ws/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
            nchan_subscriber_first_message oldest;
        }}
        location ~ ^/pub/([A-Za-z0-9_-]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 1;
            nchan_message_timeout 10m;
        }}
    }}
}}
"""


def available() -> bool:
    """True where nginx and the nchan module are installed."""
    return Path(NGINX).exists() and MODULE.exists()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (nginx's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class NchanServer(Server):
    """nginx + nchan, and the publisher that feeds it; CPU and RSS of master and workers."""

    publisher: Proc | None = None
    directory: Path

    def __init__(self, interval: float, transport: str, task: str = TASK_ID) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="nchan-", dir=LOG_DIR.parent))
        port = free_port()
        conf = self.directory / "nginx.conf"
        conf.write_text(CONFIG.format(module=MODULE, dir=self.directory, host=HOST, port=port))
        super().__init__(
            "nchan", [NGINX, "-p", str(self.directory), "-c", str(conf)], port, "/healthz"
        )
        argv = [PYTHON, "-m", "bench.nchan", "publish", "--url", self.url, "--task", task]
        argv += ["--transport", transport, "--interval", str(interval)]
        self.publisher = Proc("nchan-publisher", argv)

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())

    def stop(self, timeout: float = 8.0) -> None:
        if self.publisher is not None:
            self.publisher.stop()
        super().stop(timeout)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_nchan(interval: float, transport: str, task: str = TASK_ID) -> NchanServer:
    return NchanServer(interval, transport, task)


def frame(transport: str, task: str, n: int, seq: int) -> bytes:
    """What the minimal server pushes: the hot patch (SSE data), or the WebSocket frame."""
    data = json.dumps(hot_patch(n, time.time()), separators=(",", ":"))
    if transport == "sse":
        return data.encode()
    return f'{{"type":"patch","taskId":"{task}","seq":{seq},"data":{data}}}'.encode()


def publish(url: str, task: str, transport: str, interval: float) -> None:
    """POST a new frame every `interval` seconds on one keep-alive connection (0: one frame)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=10)
    n, seq = 0, 1_000_000
    next_at = time.monotonic()
    while True:
        n += 1
        seq += 1
        connection.request("POST", f"/pub/{task}", body=frame(transport, task, n, seq))
        connection.getresponse().read()
        if interval <= 0:
            return
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish", help="publish a frame every --interval seconds")
    pub.add_argument("--url", required=True)
    pub.add_argument("--task", default=TASK_ID)
    pub.add_argument("--transport", choices=["sse", "ws"], default="sse")
    pub.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("only ever publishes to loopback")
    publish(args.url, args.task, args.transport, args.interval)


if __name__ == "__main__":
    main()
