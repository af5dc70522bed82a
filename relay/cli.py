"""The `relay` command: `relay serve` runs the relay, `relay simulate` the simulated upstream,
`relay token` mints access tokens and `relay watch` follows a task."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import uvicorn

from . import __version__
from .config import (
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    fraction,
    load_settings,
    non_negative_float,
    positive_float,
    read_options,
    text,
    url,
)
from .logs import configure_logging
from .protocol import invalid_task_id_message, is_valid_task_id
from .server import host_port, listen, listen_each, relay_config, run
from .tokens import mint
from .workers import Workers

# A relay holds many long-lived objects per connection. With CPython's default thresholds
# (700, 10, 10) young collections run every few hundred allocations of the fan-out path,
# and full collections of 10,000 connections stall every stream for over a second
# (bench/README.md). Fewer, larger young collections; full ones still run, less often.
GC_THRESHOLDS = (50_000, 20, 10)

SERVE = {option.name: option for option in OPTIONS}


def flag(name: str, metavar: str, parse: Callable[[str], Any], help: str, default: Any) -> Option:
    """An option given by flag only: `--` and its name, dashed."""
    return Option(name, (), f"--{name.replace('_', '-')}", metavar, parse, help, default)


# `relay simulate` is a test tool: flags only, so that a relay's environment cannot change it.
SIMULATE_PORT = replace(SERVE["port"], env=(), default=8001)
SIMULATE_OPTIONS: tuple[Option, ...] = (
    replace(SERVE["host"], env=()),
    SIMULATE_PORT,
    flag("fail_rate", "SHARE", fraction, "share of tasks that fail", 0.1),
    flag("latency", "SECONDS", non_negative_float, "seconds added to every call", 0.0),
    flag("error_rate", "SHARE", fraction, "share of calls answered 500", 0.0),
    flag("throttle_rate", "SHARE", fraction, "share of calls answered 429 with Retry-After", 0.0),
    flag("retry_after", "SECONDS", non_negative_float, "how long a 429 asks callers to wait", 1.0),
    flag("timeout_rate", "SHARE", fraction, "share of calls that hang", 0.0),
    flag("hang_seconds", "SECONDS", non_negative_float, "how long a hanging call hangs", 30.0),
    flag("malformed_rate", "SHARE", fraction, "share of calls answered with a non-JSON body", 0.0),
    replace(SERVE["log_level"], env=(), default="warning"),
    replace(SERVE["log_format"], env=()),
)
ACCESS_KEY_OPTIONS = (SERVE["access_key_id"], SERVE["access_key_secret"])
TOKEN_OPTIONS = (flag("ttl", "SECONDS", positive_float, "seconds until it expires", 600.0),)
# `relay watch` is a client: its variables are not the relay's settings. The token is best
# given by RELAY_TOKEN, which, unlike a flag, no process list shows.
WATCH_OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        ("RELAY_URL",),
        "--url",
        "URL",
        url("http", "https"),
        "base URL of the relay",
        "http://127.0.0.1:8000",
    ),
    Option(
        "token",
        ("RELAY_TOKEN",),
        "--token",
        "TOKEN",
        text,
        "access token for the task, when the relay requires tokens",
        unset="no token",
    ),
)

logger = logging.getLogger("relay")


class CommandParser(argparse.ArgumentParser):
    """A command's parser: an unknown argument is reported under this command's usage."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def described(option: Option, *, env: bool = True) -> str:
    """The option's help, then its environment variables and its default, written one way."""
    notes = [f"env {' or '.join(option.env)}"] if option.env and env else []
    notes.append(f"default {option.shown_default or option.unset_text}")
    return f"{option.help} ({', '.join(notes)})"


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    # No argparse defaults or types: a flag left out is None, so that the environment can
    # fill it, and every value is parsed by one function whatever way it came.
    for option in options:
        if option.flag is not None:
            parser.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.metavar,
                help=described(option).replace("%", "%%"),
            )


def environment_only(options: Sequence[Option]) -> str:
    """The epilog listing the settings that have no flag."""
    lines = ["settings read from the environment only:"]
    for option in options:
        if option.flag is None:
            line = f"  {option.env[0]:<24} {described(option, env=False)}"
            lines.append(textwrap.fill(line, width=100, subsequent_indent=" " * 27))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="comfy-relay: live ComfyUI task progress over SSE and WebSocket.",
        epilog="Run `relay COMMAND --help` for the options of a command. Every option of"
        " `relay serve` can also be set by its environment variable; flags win.",
    )
    parser.add_argument("--version", action="version", version=f"comfy-relay {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        title="commands",
        metavar="COMMAND",
        parser_class=CommandParser,
    )
    # Descriptions and epilogs keep their line breaks; option help is wrapped to fit.
    raw = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser(
        "serve",
        help="run the relay (on its embedded simulator when no upstream is set)",
        description="Run the relay. Flags win over environment variables, which win over\n"
        "defaults. With no upstream set, the relay polls its embedded simulator, and\n"
        "the demo page at / can start simulated tasks.",
        epilog=environment_only(OPTIONS),
        usage="%(prog)s [OPTION ...]",
        formatter_class=raw,
    )
    add_options(serve, OPTIONS)

    simulate = commands.add_parser(
        "simulate",
        help="run the simulated upstream alone",
        description="Run the simulated upstream alone, for a relay to poll with\n"
        "--upstream http://HOST:PORT. It reads no environment variables, except\n"
        "the AccessKey pair with --verify-signatures.",
        usage="%(prog)s [OPTION ...]",
        formatter_class=raw,
    )
    add_options(simulate, SIMULATE_OPTIONS)
    simulate.add_argument(
        "--verify-signatures",
        action="store_true",
        help="refuse calls not signed with the AccessKey pair in RELAY_ACCESS_KEY_ID and"
        " RELAY_ACCESS_KEY_SECRET (default off)",
    )

    token = commands.add_parser(
        "token",
        help="print an access token for task IDs, signed with RELAY_TOKEN_SECRET",
        description="Print an access token (an HS256 JWT) that lets its holder watch these"
        " tasks,\nsigned with the secret in RELAY_TOKEN_SECRET, as `relay serve` reads it.",
        formatter_class=raw,
    )
    token.add_argument("task_ids", nargs="+", metavar="TASK_ID", help="a task the token covers")
    add_options(token, TOKEN_OPTIONS)

    watch = commands.add_parser(
        "watch",
        help="follow a task in the terminal: a progress line, or one JSON state per line",
        description="Follow a task to its end on a relay: a live progress line (node, step of\n"
        "max steps, progress, ETA), or with --json each whole state on a line of its own.\n"
        "Exit status 0 when the task succeeded, 1 when it failed, 2 when it is unknown,\n"
        "the relay refused, or the relay could not be reached for 30 seconds.",
        formatter_class=raw,
    )
    watch.add_argument("task_id", metavar="TASK_ID", help="the task to follow")
    add_options(watch, WATCH_OPTIONS)
    watch.add_argument(
        "--json",
        action="store_true",
        help="print each state as one line of JSON instead of the progress line (default off)",
    )
    return parser


def given(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, str | None]:
    """The raw flag values, by option name."""
    return {option.name: getattr(args, option.name, None) for option in options}


def flag_values(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    """Every option's value, from its flag or its default: for commands without settings."""
    defaults = {option.name: option.default for option in options}
    return defaults | read_options(options, given(args, options), {})


def serve(settings: Settings) -> None:
    if settings.workers > 1:
        groups = listen_each(settings.host, settings.port, SERVE["port"], settings.workers)
        sockets = groups[0]
    else:
        sockets = listen(settings.host, settings.port, SERVE["port"])
    configure_logging(settings.log_level, settings.log_format, settings.secrets)
    gc.set_threshold(*GC_THRESHOLDS)
    port = sockets[0].getsockname()[1]
    url = f"http://{host_port(settings.host, port)}/"
    if settings.simulated:
        logger.info(
            "comfy-relay %s on the embedded simulator (no upstream configured): %s",
            __version__,
            url,
        )
    else:
        logger.info("comfy-relay %s polling %s: %s", __version__, settings.upstream_url, url)
    if settings.workers == 1:
        run(relay_config(settings), sockets)
        return
    logger.info("%d workers on the port, each a node of the cluster", settings.workers)

    def rebind() -> list[socket.socket]:
        return listen(settings.host, port, SERVE["port"], reuse_port=True)

    def work(sockets: list[socket.socket]) -> bool:
        # Everything of the app (its metrics, backend, node ID) is made in the worker.
        return run(relay_config(settings), sockets)

    Workers(settings.workers, rebind, groups, work).run()


def simulate(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    from .simulator import Faults, Simulator

    values = flag_values(args, SIMULATE_OPTIONS)
    credentials = None
    if args.verify_signatures:
        # The pair as `relay serve` reads it, so one environment serves both.
        pair = read_options(ACCESS_KEY_OPTIONS, {}, environ)
        key_id, secret = pair.get("access_key_id"), pair.get("access_key_secret")
        if not key_id or not secret:
            raise ConfigError(
                "--verify-signatures needs RELAY_ACCESS_KEY_ID and RELAY_ACCESS_KEY_SECRET"
            )
        credentials = {key_id: secret}
    faults = Faults(
        latency=values["latency"],
        error_rate=values["error_rate"],
        throttle_rate=values["throttle_rate"],
        timeout_rate=values["timeout_rate"],
        malformed_rate=values["malformed_rate"],
        retry_after=values["retry_after"],
        hang_seconds=values["hang_seconds"],
    )
    simulator = Simulator(fail_rate=values["fail_rate"], faults=faults, credentials=credentials)
    sockets = listen(values["host"], values["port"], SIMULATE_PORT)
    configure_logging(values["log_level"], values["log_format"], (credentials or {}).values())
    url = f"http://{host_port(values['host'], sockets[0].getsockname()[1])}"
    # Warnings only by default, which keeps uvicorn's start-up lines out of the way; but
    # where the simulator listens is worth its line at any level short of `error`.
    startup = logging.getLogger("relay.simulate")
    if values["log_level"] != "error":
        startup.setLevel(logging.INFO)
    startup.info(
        "comfy-relay %s simulator listening on %s/ (for `relay serve --upstream %s"
        " --signing none`)",
        __version__,
        url,
        url,
    )
    config = uvicorn.Config(
        simulator.app,
        host=values["host"],
        port=values["port"],
        log_config=None,
        log_level=values["log_level"],
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    run(config, sockets)


def token(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    # The secret as `relay serve` reads it: the same variable, parser and length rule.
    secret = read_options((SERVE["token_secret"],), {}, environ).get("token_secret")
    if secret is None:
        raise ConfigError("RELAY_TOKEN_SECRET is not set: there is no secret to sign with")
    ttl = flag_values(args, TOKEN_OPTIONS)["ttl"]
    for task_id in args.task_ids:
        if not is_valid_task_id(task_id):
            raise ConfigError(invalid_task_id_message(task_id))
    print(mint(secret, args.task_ids, ttl))


def watch(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    import asyncio

    from .client.terminal import watch_in_terminal

    values = {option.name: option.default for option in WATCH_OPTIONS}
    values |= read_options(WATCH_OPTIONS, given(args, WATCH_OPTIONS), environ)
    if not is_valid_task_id(args.task_id):
        raise ConfigError(invalid_task_id_message(args.task_id))
    follow = watch_in_terminal(
        values["url"],
        args.task_id,
        token=values["token"],
        json_lines=args.json,
        out=sys.stdout,
        err=sys.stderr,
    )
    try:
        status = asyncio.run(follow)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        status = 130  # as a shell reports a command stopped by Ctrl-C
    except BrokenPipeError:
        # The reader left (`relay watch --json ID | head -1`): no traceback, and nothing
        # more for Python to flush into the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141  # as a shell reports a command stopped by SIGPIPE
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command. Exit 2, with one `relay: error:` line, on a setting it cannot use."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        # Without a command there is nothing to do: show everything there is.
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(load_settings(given(args, OPTIONS), os.environ))
        elif args.command == "simulate":
            simulate(args, os.environ)
        elif args.command == "token":
            token(args, os.environ)
        elif args.command == "watch":
            watch(args, os.environ)
    except ConfigError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
