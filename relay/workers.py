"""`relay serve --workers N`: the supervisor of N forked relay processes on one port."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

from .config import ConfigError
from .server import GRACEFUL_SHUTDOWN_SECONDS

logger = logging.getLogger("relay")

# uvicorn's exit status when an app's startup fails; a worker that cannot start stops them all.
STARTUP_FAILURE = 3
# How long workers get to close their streams, stop their loops and release their leases
# after SIGTERM before the parent kills what is left.
WORKER_EXIT_SECONDS = GRACEFUL_SHUTDOWN_SECONDS + 5
RESTART_DELAY_MAX = 30.0


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Workers:
    """`relay serve --workers N`: N forked processes serving one port, each a cluster node.

    Each worker serves its own SO_REUSEPORT socket and runs the whole relay (its own
    backend, with its own node ID). The parent only forks, forwards SIGTERM and SIGINT
    (as SIGTERM: the workers run in their own process group, so a terminal's Ctrl-C reaches
    the parent alone and each worker shuts down once, gracefully), restarts a worker that
    died, and exits once they all have: within WORKER_EXIT_SECONDS, or it kills the rest.
    """

    def __init__(
        self,
        count: int,
        rebind: Callable[[], list[socket.socket]],
        sockets: list[list[socket.socket]],
        work: Callable[[list[socket.socket]], bool],
    ) -> None:
        self.count = count
        self.rebind = rebind
        self.sockets: list[list[socket.socket] | None] = list(sockets)
        self.work = work
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker, started)
        self.restarts: dict[int, float] = {}  # worker -> when to start it again
        self.delays = [0.5] * count  # doubled at each death: 1 s first
        self.stopping: int | None = None
        self.failed = False

    def on_signal(self, signum: int, frame: object) -> None:
        if self.stopping is None:
            self.stopping = signum
        self.forward()

    def forward(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # so that it wakes select
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)
        for worker in range(self.count):
            self.spawn(worker)
        deadline: float | None = None
        while self.children or (self.restarts and self.stopping is None):
            waits = [when - time.monotonic() for when in self.restarts.values()]
            if deadline is not None:
                waits.append(deadline - time.monotonic())
            select.select([wake_r], [], [], max(0.0, min(waits)) if waits else None)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            self.reap()
            if self.stopping is not None and deadline is None:
                deadline = time.monotonic() + WORKER_EXIT_SECONDS
                self.forward()  # again: a worker forked as the signal came missed it
                self.restarts.clear()
                self.close_sockets()  # new connections are refused, not left waiting
            if deadline is not None and time.monotonic() >= deadline:
                logger.error("workers still running after %ds: killing them", WORKER_EXIT_SECONDS)
                for pid in self.children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            for worker, when in list(self.restarts.items()):
                if when <= time.monotonic():
                    del self.restarts[worker]
                    self.spawn(worker)
        self.close_sockets()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
        if self.failed:
            raise SystemExit(STARTUP_FAILURE)
        if self.stopping is not None:
            # As uvicorn does once it has shut down: exit by the signal that stopped us.
            signal.signal(self.stopping, signal.SIG_DFL)
            os.kill(os.getpid(), self.stopping)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker, started = self.children.pop(pid)
            if self.stopping is not None:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if code == STARTUP_FAILURE:
                logger.error("worker %d (pid %d) could not start: stopping", worker, pid)
                self.failed = True
                self.on_signal(signal.SIGTERM, None)
                continue
            lived = time.monotonic() - started
            delay = 1.0 if lived > 60 else min(self.delays[worker] * 2, RESTART_DELAY_MAX)
            self.delays[worker] = delay
            logger.error(
                "worker %d (pid %d) %s; starting another in %.0fs", worker, pid, how, delay
            )
            # Its socket goes with it: connections waiting there are refused, not stranded,
            # and the kernel sends new ones to the other workers until the new one binds.
            for sock in self.sockets[worker] or []:
                sock.close()
            self.sockets[worker] = None
            self.restarts[worker] = time.monotonic() + delay

    def spawn(self, worker: int) -> None:
        if self.stopping is not None:
            return
        if self.sockets[worker] is None:
            try:
                self.sockets[worker] = self.rebind()
            except ConfigError as exc:
                logger.error("worker %d cannot listen: %s; trying again", worker, exc)
                self.restarts[worker] = time.monotonic() + RESTART_DELAY_MAX
                return
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            pid = os.fork()
            if pid == 0:
                self.become_worker(worker, parent, blocked)
            self.children[pid] = (worker, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def become_worker(self, worker: int, parent: int, mask: set[int | signal.Signals]) -> None:
        """In the forked child: never returns into the parent's code."""
        code = 1
        try:
            os.setpgid(0, 0)
            die_with_parent()
            if os.getppid() != parent:
                os._exit(1)  # the parent died before it could be followed
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            mine = self.sockets[worker] or []
            for other in self.sockets:
                for sock in other or []:
                    if sock not in mine:
                        sock.close()
            code = 0 if self.work(mine) else STARTUP_FAILURE
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logger.exception("worker %d failed", worker)
        finally:
            os._exit(code)

    def close_sockets(self) -> None:
        for sockets in self.sockets:
            for sock in sockets or []:
                sock.close()
