"""Serving: the listening sockets, bound before anything starts, and uvicorn's configuration."""

from __future__ import annotations

import errno
import socket

import uvicorn
from starlette.types import ASGIApp

from .config import ConfigError, Option, Settings

# uvicorn's WebSocket backend on websockets' Sans-I/O protocol: it stops `send` while the
# socket's buffer is full, which is what lets the relay notice a client that stopped reading.
WS_BACKEND = "websockets-sansio"
GRACEFUL_SHUTDOWN_SECONDS = 3


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(
    host: str, port: int, port_option: Option, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bind the listening sockets before anything else starts.

    A busy port is then one clear line, not a started server that fails; and uvicorn serves
    these very sockets, so nothing can take the port between this check and the server.
    `reuse_port`: sockets of a group (SO_REUSEPORT) that share the port, one per worker.
    """
    where = host_port(host, port)
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # A name such as localhost can stand for an IPv4 and an IPv6 address: serve both.
        for family, address in dict.fromkeys((info[0], info[4]) for info in found):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            # As uvicorn binds: a restart may reuse the port of connections in TIME_WAIT,
            # and an IPv6 socket leaves the IPv4 address to its own socket.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            ways = " or ".join(filter(None, (port_option.flag, "/".join(port_option.env))))
            raise ConfigError(
                f"{where} is already in use: choose another port with {ways}"
            ) from None
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sockets


def run(config: uvicorn.Config, sockets: list[socket.socket]) -> bool:
    """Serve until a signal; False when the app did not start (its lifespan failed)."""
    # uvicorn.Server handles SIGINT and SIGTERM as uvicorn.run does, and closes the sockets.
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    return bool(server.started)


def listen_each(host: str, port: int, port_option: Option, count: int) -> list[list[socket.socket]]:
    """A set of listening sockets per worker, all on one port: SO_REUSEPORT lets the kernel
    spread new connections over them, and a worker's death takes only its own socket away.

    The port is first bound without SO_REUSEPORT, so that a port any other socket holds
    (even another relay's group) is still one clear line.
    """
    probe = listen(host, port, port_option)
    port = probe[0].getsockname()[1]
    for sock in probe:
        sock.close()
    return [listen(host, port, port_option, reuse_port=True) for _ in range(count)]


def relay_config(settings: Settings, app: ASGIApp | None = None) -> uvicorn.Config:
    """How uvicorn serves a relay: `app`, or a new one made from `settings`."""
    if app is None:
        from .app import create_app

        app = create_app(settings)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        ws=WS_BACKEND,
        ws_max_size=settings.ws_max_size,
        # Compression contexts are per socket: each message would be compressed once per
        # subscriber, not once per change, and each socket would hold a zlib state.
        ws_per_message_deflate=settings.ws_compression,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )
