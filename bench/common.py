"""What every benchmark shares: child processes on loopback, /proc readings, statistics, tables.

Every server (relay, simulator, fixed upstream, minimal server) and every load client runs
as its own child process, so the relay's CPU time and memory are its own, and no process
holds more than its share of the 20,000 open files allowed per process. Everything listens
on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOG_DIR = Path(tempfile.gettempdir()) / f"comfy-relay-bench-{os.getpid()}"
CLIENTS_PER_PROCESS = 5000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- /proc ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, str]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    versions = []
    for name in ("uvicorn", "starlette", "sse_starlette", "websockets", "httpx", "aiohttp"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            versions.append(f"{name} {module.__version__}")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "cpu": cpu_model,
        "python": platform.python_version(),
        "libraries": ", ".join(versions),
    }


def machine_line() -> str:
    m = machine()
    return (
        f"{m['date']}; nproc {m['nproc']}, {m['memory']} RAM, {m['cpu']}; "
        f"Python {m['python']}; {m['libraries']}"
    )


# -- HTTP without a client library ---------------------------------------------------------


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


# -- child processes -----------------------------------------------------------------------


class Proc:
    """A child process whose output goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, name: str, argv: Sequence[str], *, stdin: bool = False, cwd: Path = ROOT
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 8.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Server(Proc):
    """A server child listening on a loopback port; ready once `ready_path` answers."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, ready_path: str, *, cwd: Path = ROOT
    ) -> None:
        super().__init__(name, argv, cwd=cwd)
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.ws_url = f"ws://{HOST}:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                http_json("GET", self.url + ready_path, timeout=2)
                return
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name} did not start:\n{self.log_tail()}") from None
                time.sleep(0.1)


def start_simulator() -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "relay", "simulate", "--port", str(port), "--fail-rate", "0"]
    return Server("simulator", argv, port, "/sim/stats")


def start_fixed_upstream() -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "bench.fixed_upstream", "--port", str(port)]
    return Server("fixed-upstream", argv, port, "/healthz")


def gc_wrapped(module: str, gc_stats: Path | None, options: Sequence[str] = ()) -> list[str]:
    """`python -m module`, or under bench/gcwrap.py writing its collections to `gc_stats`."""
    if gc_stats is None:
        return [PYTHON, "-m", module]
    return [PYTHON, "-m", "bench.gcwrap", str(gc_stats), *options, module]


def read_gc(gc_stats: Path | None) -> dict[str, float]:
    """Collections and seconds spent in them so far, all generations and the full ones."""
    if gc_stats is None or not gc_stats.exists():
        return {}
    data = json.loads(gc_stats.read_text())
    return {
        "seconds": sum(v["seconds"] for v in data.values()),
        "full_seconds": data["2"]["seconds"],
        "full": data["2"]["collections"],
        "full_max_ms": data["2"]["max_ms"],
    }


def start_relay(
    upstream: str,
    poll_interval: float,
    *extra: str,
    gc_stats: Path | None = None,
    gc_options: Sequence[str] = (),
    python: str = PYTHON,
    cwd: Path = ROOT,
) -> Server:
    """`relay serve`; `python` and `cwd` choose the tree under test (its venv's python
    runs `relay` from its own checkout), this one by default."""
    port = free_port()
    argv = [
        python,
        *gc_wrapped("relay", gc_stats, gc_options)[1:],
        "serve",
        "--port",
        str(port),
        "--upstream",
        upstream,
        "--signing",
        "none",
        "--poll-interval",
        str(poll_interval),
        "--log-level",
        "warning",
        # Room for a 10k run plus stragglers of the one before (the default cap is 10,000).
        "--max-connections",
        "15000",
        *extra,
    ]
    return Server("relay", argv, port, "/healthz", cwd=cwd)


def start_minimal(
    interval: float, gc_stats: Path | None = None, *, per_task: bool = False
) -> Server:
    """The stack's own limit: Starlette + sse-starlette / WebSocket pushing pre-encoded frames.

    `per_task`: a broadcast per task ID, each at its own random phase (many tasks).
    """
    port = free_port()
    argv = [*gc_wrapped("bench.minimal_server", gc_stats), "--port", str(port)]
    argv += ["--interval", str(interval)]
    if per_task:
        argv.append("--per-task")
    return Server("minimal", argv, port, "/healthz")


class LoadClient(Proc):
    """A load-client child (bench/loadclient.py), driven by one-line commands on its stdin."""

    def __init__(
        self,
        base_url: str,
        transport: str,
        spec: Sequence[tuple[str, int]],
        *,
        latency: bool = False,
        path: str = "/v1/tasks/{task}/events",
    ) -> None:
        argv = [
            PYTHON,
            "-m",
            "bench.loadclient",
            "--url",
            base_url,
            "--transport",
            transport,
            "--path",
            path,
            "--spec",
            json.dumps(list(spec)),
        ]
        if latency:
            argv.append("--latency")
        super().__init__(f"load-{transport}", argv, stdin=True)
        self.count = sum(n for _, n in spec)

    def command(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(name.encode() + b"\n")
        self.popen.stdin.flush()
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"load client did not answer {name!r}:\n{self.log_tail()}")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"load client exited:\n{self.log_tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.command("quit", timeout=timeout)
        super().stop(timeout)


class LoadGroup:
    """Load clients for `spec`, split over processes of at most CLIENTS_PER_PROCESS sockets."""

    def __init__(
        self,
        base_url: str,
        transport: str,
        spec: Sequence[tuple[str, int]],
        *,
        latency: bool = False,
        path: str = "/v1/tasks/{task}/events",
        per_process: int = CLIENTS_PER_PROCESS,
    ) -> None:
        self.clients: list[LoadClient] = []
        for chunk in split_spec(spec, per_process):
            self.clients.append(LoadClient(base_url, transport, chunk, latency=latency, path=path))
        self.count = sum(n for _, n in spec)

    def wait_ready(self, timeout: float = 120.0) -> int:
        """Wait until every connection has had its first event (or failed); returns how many."""
        deadline = time.monotonic() + timeout
        while True:
            stats = [c.stats() for c in self.clients]
            ready = sum(s["ready"] for s in stats)
            failed = sum(s["failed"] for s in stats)
            if ready + failed >= self.count:
                if failed:
                    log(f"warning: {failed} of {self.count} connections failed")
                return ready
            if time.monotonic() > deadline:
                log(f"warning: only {ready} of {self.count} connections ready in time")
                return ready
            time.sleep(0.25)

    def stats(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for client in self.clients:
            for key, value in client.stats().items():
                if isinstance(value, int | float):
                    totals[key] = totals.get(key, 0) + value
        return totals

    def cpu(self) -> float:
        return sum(c.cpu() for c in self.clients)

    def command(self, name: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        return [c.command(name, timeout) for c in self.clients]

    def stop(self) -> None:
        for client in self.clients:
            client.stop()


def split_spec(spec: Sequence[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    chunks: list[list[tuple[str, int]]] = [[]]
    room = size
    for task, count in spec:
        while count > 0:
            if room == 0:
                chunks.append([])
                room = size
            take = min(room, count)
            chunks[-1].append((task, take))
            count -= take
            room -= take
    return [c for c in chunks if c]


# -- statistics and tables -------------------------------------------------------------


def summary(values: Iterable[float], digits: int = 1) -> str:
    """`median (min-max)` of a few repetitions."""
    values = list(values)
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def emit(title: str, command: str, body: str, out: Path | None = None) -> str:
    """Print one result section (markdown); append it to `out` when given."""
    text = f"### {title}\n\n`{command}` — {machine_line()}\n\n{body}\n"
    print(text, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")
    return text


def command_line() -> str:
    """How this benchmark was started, as it could be typed again from the project root."""
    module = sys.argv[0]
    with contextlib.suppress(ValueError):
        module = Path(module).resolve().relative_to(ROOT).with_suffix("").as_posix()
    module = module.replace("/", ".").removesuffix(".__main__")
    return " ".join(["python -m", module, *sys.argv[1:]])


# -- the hot task both the fixed upstream and the minimal server describe ------------------


def hot_state(task_id: str, n: int, now: float) -> dict[str, Any]:
    """The n-th state of a task that changes on every poll; `sentAt` is when it was made."""
    return {
        "taskId": task_id,
        "status": "running",
        "progress": round((n % 997) / 997, 8),
        "etaRelative": round(3600 - (n * 0.1) % 3600, 6),
        "message": "Executing node KSampler",
        "state": {"step": n % 20 + 1, "maxSteps": 20, "nodeLabel": "KSampler"},
        "sentAt": now,
    }


def hot_patch(n: int, now: float) -> dict[str, Any]:
    """The merge patch from hot state n-1 to hot state n, as the relay computes it."""
    return {
        "progress": round((n % 997) / 997, 8),
        "etaRelative": round(3600 - (n * 0.1) % 3600, 6),
        "state": {"step": n % 20 + 1},
        "sentAt": now,
    }


def idle_state(task_id: str) -> dict[str, Any]:
    """A queued task that does not change: what an idle subscriber watches."""
    return {
        "taskId": task_id,
        "status": "waiting",
        "progress": 0,
        "etaRelative": 0,
        "lastQueueRemaining": 9,
    }


def collapsed_samples(
    collapsed: str, full_path: bool = False
) -> tuple[dict[str, int], dict[str, int], int]:
    """Self and inclusive sample counts per function, and the total, from py-spy's
    collapsed stacks (`frame;frame;... count` lines). A function is named
    `name (file)`, the file with its path when `full_path`."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            name, _, where = frame.partition(" (")
            where = where.split(":")[0]
            frames.append(f"{name} ({where if full_path else where.rsplit('/', 1)[-1]})")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    return own, inclusive, total
