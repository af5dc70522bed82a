"""The `relay` command: `relay serve` runs the relay, `relay simulate` the simulated upstream."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

from . import __version__
from .config import (
    OPTIONS,
    ConfigError,
    Settings,
    fraction,
    load_settings,
    non_negative_float,
    port_number,
    positive_float,
)
from .protocol import invalid_task_id_message, is_valid_task_id
from .tokens import SecretTooShort, check_secret, mint

# uvicorn's WebSocket backend on websockets' Sans-I/O protocol: it stops `send` while the
# socket's buffer is full, which is what lets the relay notice a client that stopped reading.
WS_BACKEND = "websockets-sansio"
# A relay holds many long-lived objects per connection. With CPython's default thresholds
# (700, 10, 10) young collections run every few hundred allocations of the fan-out path,
# and full collections of 10,000 connections stall every stream for over a second
# (bench/README.md). Fewer, larger young collections; full ones still run, less often.
GC_THRESHOLDS = (50_000, 20, 10)
DEFAULT_TOKEN_TTL = "600"
GRACEFUL_SHUTDOWN_SECONDS = 3

logger = logging.getLogger("relay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="comfy-relay: live ComfyUI task progress over SSE and WebSocket."
    )
    parser.add_argument("--version", action="version", version=f"comfy-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the relay (on the embedded simulator by default)"
    )
    for option in OPTIONS:
        if option.flag is not None:
            serve.add_argument(option.flag, dest=option.name, metavar="VALUE", help=option.help)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    simulate = commands.add_parser("simulate", help="run the simulated upstream alone")
    simulate.add_argument("--host", default="127.0.0.1", help="listening address")
    simulate.add_argument("--port", default="8001", help="listening port (default 8001)")
    simulate.add_argument(
        "--fail-rate", default="0.1", help="share of tasks that end failed (default 0.1)"
    )
    simulate.add_argument("--latency", default="0", help="seconds added to every call")
    simulate.add_argument("--error-rate", default="0", help="share of calls answered HTTP 500")
    simulate.add_argument(
        "--throttle-rate", default="0", help="share of calls answered 429 with Retry-After"
    )
    simulate.add_argument(
        "--retry-after", default="1", help="seconds a 429 asks the caller to wait (default 1)"
    )
    simulate.add_argument("--timeout-rate", default="0", help="share of calls that hang")
    simulate.add_argument(
        "--hang-seconds", default="30", help="how long a hanging call hangs (default 30)"
    )
    simulate.add_argument(
        "--malformed-rate", default="0", help="share of calls answered with a non-JSON body"
    )
    simulate.add_argument(
        "--verify-signatures",
        action="store_true",
        help="refuse calls not signed with RELAY_ACCESS_KEY_ID / RELAY_ACCESS_KEY_SECRET",
    )
    simulate.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"])

    token = commands.add_parser(
        "token", help="print an access token for task IDs, signed with RELAY_TOKEN_SECRET"
    )
    token.add_argument("task_ids", nargs="+", metavar="TASK_ID", help="task IDs it may watch")
    token.add_argument(
        "--ttl", default=DEFAULT_TOKEN_TTL, help="seconds until it expires (default 600)"
    )
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: one line per poll is noise, not news.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(settings: Settings, log_level: str) -> None:
    from .app import create_app

    if settings.token_secret is not None:
        try:
            check_secret(settings.token_secret)
        except SecretTooShort as exc:
            raise ConfigError(f"RELAY_TOKEN_SECRET {exc}") from None
    setup_logging(log_level)
    gc.set_threshold(*GC_THRESHOLDS)
    url = f"http://{settings.host}:{settings.port}/"
    if settings.simulated:
        logger.info(
            "comfy-relay %s on the embedded simulator (no upstream configured): %s",
            __version__,
            url,
        )
    else:
        logger.info("comfy-relay %s polling %s: %s", __version__, settings.upstream_url, url)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=log_level,
        access_log=False,
        ws=WS_BACKEND,
        ws_max_size=settings.ws_max_size,
        # Compression contexts are per socket: each message would be compressed once per
        # subscriber, not once per change, and each socket would hold a zlib state.
        ws_per_message_deflate=settings.ws_compression,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )


def simulate(args: argparse.Namespace) -> None:
    from .simulator import Faults, Simulator

    def parsed(flag: str, parse: Callable[[str], Any]) -> Any:
        try:
            return parse(getattr(args, flag.removeprefix("--").replace("-", "_")))
        except ValueError as exc:
            raise ConfigError(f"{flag} {exc}") from None

    port = parsed("--port", port_number)
    faults = Faults(
        latency=parsed("--latency", non_negative_float),
        error_rate=parsed("--error-rate", fraction),
        throttle_rate=parsed("--throttle-rate", fraction),
        timeout_rate=parsed("--timeout-rate", fraction),
        malformed_rate=parsed("--malformed-rate", fraction),
        retry_after=parsed("--retry-after", non_negative_float),
        hang_seconds=parsed("--hang-seconds", non_negative_float),
    )
    credentials = None
    if args.verify_signatures:
        key_id, secret = (
            os.environ.get("RELAY_ACCESS_KEY_ID"),
            os.environ.get("RELAY_ACCESS_KEY_SECRET"),
        )
        if not key_id or not secret:
            raise ConfigError(
                "--verify-signatures needs RELAY_ACCESS_KEY_ID and RELAY_ACCESS_KEY_SECRET"
            )
        credentials = {key_id: secret}
    simulator = Simulator(
        fail_rate=parsed("--fail-rate", fraction), faults=faults, credentials=credentials
    )
    setup_logging(args.log_level)
    logger.info("comfy-relay simulator on http://%s:%d/", args.host, port)
    uvicorn.run(
        simulator.app,
        host=args.host,
        port=port,
        log_config=None,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )


def token(args: argparse.Namespace) -> None:
    secret = os.environ.get("RELAY_TOKEN_SECRET", "").strip()  # as `relay serve` reads it
    if not secret:
        raise ConfigError("RELAY_TOKEN_SECRET is not set: there is no secret to sign with")
    try:
        ttl = positive_float(args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl {exc}") from None
    for task_id in args.task_ids:
        if not is_valid_task_id(task_id):
            raise ConfigError(invalid_task_id_message(task_id))
    try:
        print(mint(secret, args.task_ids, ttl))
    except SecretTooShort as exc:
        raise ConfigError(f"RELAY_TOKEN_SECRET {exc}") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            flags = {option.name: getattr(args, option.name, None) for option in OPTIONS}
            settings = load_settings(flags, os.environ)
            serve(settings, args.log_level)
        elif args.command == "simulate":
            simulate(args)
        elif args.command == "token":
            token(args)
    except ConfigError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
