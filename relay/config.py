"""Settings: command-line flags win over environment variables, which win over defaults.

Each setting is declared once, on its `Settings` field: default, environment variables,
flag, parser and help. The command line, its help and docs/settings.md derive from that.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .logs import FORMATS, LEVELS

T = TypeVar("T")
N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting has a value the relay cannot use; the message names the setting."""


def bounded(
    kind: Callable[[str], N],
    low: N | None = None,
    high: N | None = None,
    *,
    exclusive: bool = False,
) -> Callable[[str], N]:
    """A parser of numbers from low to high; `exclusive` leaves low itself out."""
    noun = "whole number" if kind is int else "number"
    if low is not None and high is not None:
        wanted = f"a {noun} from {low:g} to {high:g}"
    elif low == 0 and exclusive:
        wanted = f"a positive {noun}"
    elif low is not None:
        wanted = f"a {noun} {'>' if exclusive else '>='} {low:g}"
    else:
        wanted = f"a {noun}"

    def parse(raw: str) -> N:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"must be {wanted}, got {raw!r}") from None
        below = low is not None and (value <= low if exclusive else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise ValueError(f"must be {wanted}, got {raw!r}")
        return value

    return parse


positive_float = bounded(float, 0.0, exclusive=True)
non_negative_float = bounded(float, 0.0)
fraction = bounded(float, 0.0, 1.0)
positive_int = bounded(int, 1)
port_number = bounded(int, 0, 65535)


@dataclass(frozen=True)
class OneOf:
    """A parser that takes one of a few words, in any case."""

    choices: tuple[str, ...]

    def __call__(self, raw: str) -> str:
        value = raw.strip().lower()
        if value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {raw!r}")
        return value

    @property
    def metavar(self) -> str:
        return "{" + ",".join(self.choices) + "}"


def url(*schemes: str) -> Callable[[str], str]:
    """A parser of URLs with one of these schemes; a trailing slash is dropped."""
    *others, last = (f"{scheme}://" for scheme in schemes)
    wanted = f"{', '.join(others)} or {last}" if others else last

    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        # unix:///path/to/socket has no host; every other scheme needs one.
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ValueError(f"must be a URL starting with {wanted}, got {raw!r}")
        return raw.strip().rstrip("/")

    return parse


def origin_list(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError(f"must list origins like https://example.com, got {origin!r}")
    return origins


def text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(raw: str) -> int:
    """A whole number of processes, or `auto`: one per core."""
    if raw.strip().lower() == "auto":
        return cores()
    try:
        return positive_int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number >= 1 or auto, got {raw!r}") from None


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be 1 or 0 (true or false), got {raw!r}")


def api_key(raw: str) -> str:
    if len(raw.strip()) < 16:
        raise ValueError("must be at least 16 characters")
    return raw.strip()


def webhook_secret(raw: str) -> str:
    # Imported only when a secret is given: relay.watches loads httpx and sqlite3, which
    # the other commands and a relay without webhooks do without.
    from .watches.webhooks import decode_secret

    decode_secret(raw)
    return raw.strip()


def token_secret(raw: str) -> str:
    # Imported only when a secret is given: relay.tokens loads PyJWT.
    from .tokens import check_secret

    return check_secret(text(raw))


BOOLEAN = "{0,1}"
WEBHOOK_EVENTS = OneOf(("end", "all"))
SIGNING = OneOf(("apigw", "none"))
LOG_LEVELS = OneOf(LEVELS)
LOG_FORMATS = OneOf(FORMATS)


@dataclass(frozen=True)
class Option:
    """One setting as an operator gives it: environment variables, flag, parser, help."""

    name: str
    env: tuple[str, ...]
    flag: str | None
    metavar: str
    parse: Callable[[str], Any]
    help: str
    default: Any = None
    unset: str = ""  # what leaving it unset means, where the default is no value
    secret: bool = False

    @property
    def shown_default(self) -> str | None:
        """The default as help and docs write it, or None when it is unset."""
        value = self.default
        if value is None or value == ():
            return None
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value)

    @property
    def unset_text(self) -> str:
        """What leaving the option unset means, as help and docs write it."""
        return f"unset: {self.unset}" if self.unset else "unset"


def setting(
    default: T,
    env: str | tuple[str, ...],
    flag: str | None,
    metavar: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    unset: str = "",
    secret: bool = False,
) -> T:
    """A `Settings` field with its declaration; typed like `dataclasses.field`."""
    declaration = {
        "env": (env,) if isinstance(env, str) else env,
        "flag": flag,
        "metavar": metavar,
        "parse": parse,
        "help": help,
        "unset": unset,
        "secret": secret,
    }
    return field(default=default, repr=not secret, metadata=declaration)


@dataclass(frozen=True)
class Settings:
    upstream_url: str | None = setting(
        None,
        "RELAY_UPSTREAM_URL",
        "--upstream",
        "URL",
        url("http", "https"),
        "base URL of the progress API",
        unset="embedded simulator",
    )
    access_key_id: str | None = setting(
        None, "RELAY_ACCESS_KEY_ID", None, "ID", text, "AccessKey ID, the SDKs' app key"
    )
    access_key_secret: str | None = setting(
        None,
        "RELAY_ACCESS_KEY_SECRET",
        None,
        "SECRET",
        text,
        "AccessKey secret: never logged, never sent to browsers",
        secret=True,
    )
    signing: str = setting(
        "apigw",
        "RELAY_SIGNING",
        "--signing",
        SIGNING.metavar,
        SIGNING,
        "how upstream calls are signed: API Gateway's digest scheme, or none (key ID only;"
        " an upstream without the AccessKey pair needs none)",
    )
    poll_interval: float = setting(
        1.0,
        "RELAY_POLL_INTERVAL",
        "--poll-interval",
        "SECONDS",
        positive_float,
        "seconds between polls of a running task",
    )
    linger: float = setting(
        2.0,
        "RELAY_LINGER",
        "--linger",
        "SECONDS",
        non_negative_float,
        "seconds a loop lives on after its last subscriber left",
    )
    redis_url: str | None = setting(
        None,
        "RELAY_REDIS_URL",
        "--redis",
        "URL",
        url("redis", "rediss", "unix"),
        "Redis URL: turns cluster mode on (needs --upstream)",
        unset="single process",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "RELAY_ALLOWED_ORIGINS",
        "--allowed-origins",
        "ORIGINS",
        origin_list,
        "CORS and WebSocket Origin allowlist, comma separated",
        unset="same origin",
    )
    port: int = setting(
        8000, ("RELAY_PORT", "PORT"), "--port", "PORT", port_number, "listening port"
    )
    host: str = setting("127.0.0.1", "RELAY_HOST", "--host", "HOST", text, "listening address")
    workers: int = setting(
        1,
        "RELAY_WORKERS",
        "--workers",
        "N",
        worker_count,
        "processes serving the port, each a node of the cluster (needs --redis); auto: one"
        " per core",
    )
    request_timeout: float = setting(
        10.0,
        "RELAY_REQUEST_TIMEOUT",
        "--request-timeout",
        "SECONDS",
        positive_float,
        "seconds before an upstream call counts as failed",
    )
    backoff_max: float = setting(
        30.0,
        "RELAY_BACKOFF_MAX",
        "--backoff-max",
        "SECONDS",
        positive_float,
        "longest wait, in seconds, between retries of a failing upstream",
    )
    upstream_concurrency: int = setting(
        32,
        "RELAY_UPSTREAM_CONCURRENCY",
        "--upstream-concurrency",
        "N",
        positive_int,
        "upstream calls in flight at once",
    )
    upstream_rate: float | None = setting(
        None,
        "RELAY_UPSTREAM_RATE",
        "--upstream-rate",
        "PER_SECOND",
        positive_float,
        "upstream calls per second across all tasks",
        unset="no limit",
    )
    waiting_interval_max: float = setting(
        5.0,
        "RELAY_WAITING_INTERVAL_MAX",
        "--waiting-interval-max",
        "SECONDS",
        positive_float,
        "longest poll interval of a task waiting in the queue",
    )
    fetch_result: bool = setting(
        True,
        "RELAY_FETCH_RESULT",
        "--fetch-result",
        BOOLEAN,
        boolean,
        "add comfy_get_result's answer to a succeeded task's final state",
    )
    max_connections: int = setting(
        10_000,
        "RELAY_MAX_CONNECTIONS",
        "--max-connections",
        "N",
        positive_int,
        "open /v1/ requests (streams, WebSockets, state lookups) per process; more get 503",
    )
    lease_ttl: float = setting(
        3.0,
        "RELAY_LEASE_TTL",
        "--lease-ttl",
        "SECONDS",
        positive_float,
        "cluster mode: seconds before a dead polling node's tasks are taken over",
    )
    ended_ttl: float = setting(
        60.0,
        "RELAY_ENDED_TTL",
        "--ended-ttl",
        "SECONDS",
        non_negative_float,
        "seconds an ended task's final state is kept for late subscribers",
    )
    max_stream_tasks: int = setting(
        32,
        "RELAY_MAX_STREAM_TASKS",
        "--max-stream-tasks",
        "N",
        positive_int,
        "task IDs allowed on one multiplexed SSE stream",
    )
    ping_interval: float = setting(
        15.0,
        "RELAY_PING_INTERVAL",
        "--ping-interval",
        "SECONDS",
        positive_float,
        "seconds between keep-alive comments on idle SSE streams",
    )
    send_timeout: float = setting(
        10.0,
        "RELAY_SEND_TIMEOUT",
        "--send-timeout",
        "SECONDS",
        positive_float,
        "seconds a client may take to accept one message before its connection is reset",
    )
    token_secret: str | None = setting(
        None,
        "RELAY_TOKEN_SECRET",
        None,
        "SECRET",
        token_secret,
        "HS256 secret of subscription tokens, at least 32 bytes: set, every subscription"
        " needs a token",
        unset="no tokens",
        secret=True,
    )
    max_ws_subscriptions: int = setting(
        100,
        "RELAY_MAX_WS_SUBSCRIPTIONS",
        "--max-ws-subscriptions",
        "N",
        positive_int,
        "task subscriptions on one WebSocket",
    )
    ws_max_size: int = setting(
        65_536,
        "RELAY_WS_MAX_SIZE",
        "--ws-max-size",
        "BYTES",
        positive_int,
        "largest WebSocket message a client may send; larger closes the socket with 1009",
    )
    ws_compression: bool = setting(
        False,
        "RELAY_WS_COMPRESSION",
        "--ws-compression",
        BOOLEAN,
        boolean,
        "offer permessage-deflate on WebSockets; costs CPU and memory per socket",
    )
    max_loops: int = setting(
        10_000,
        "RELAY_MAX_LOOPS",
        "--max-loops",
        "N",
        positive_int,
        "poll loops per process; subscriptions that need one more get overloaded",
    )
    api_key: str | None = setting(
        None,
        "RELAY_API_KEY",
        None,
        "KEY",
        api_key,
        "bearer key of the server-to-server API (watches), at least 16 characters",
        unset="server API off",
        secret=True,
    )
    webhook_url: str | None = setting(
        None,
        "RELAY_WEBHOOK_URL",
        "--webhook-url",
        "URL",
        url("http", "https"),
        "where events of watched tasks are POSTed; needs RELAY_WEBHOOK_SECRET",
        unset="no webhooks",
    )
    webhook_secret: str | None = setting(
        None,
        "RELAY_WEBHOOK_SECRET",
        None,
        "SECRET",
        webhook_secret,
        "Standard Webhooks secret (whsec_ and base64) that signs webhooks: never logged",
        secret=True,
    )
    webhook_events: str = setting(
        "end",
        "RELAY_WEBHOOK_EVENTS",
        "--webhook-events",
        WEBHOOK_EVENTS.metavar,
        WEBHOOK_EVENTS,
        "events of watched tasks sent: their end, or all (every change too)",
    )
    watch_ttl: float = setting(
        21_600.0,
        "RELAY_WATCH_TTL",
        "--watch-ttl",
        "SECONDS",
        positive_float,
        "seconds a server-held watch lasts at most",
    )
    data_dir: str | None = setting(
        None,
        "RELAY_DATA_DIR",
        "--data-dir",
        "DIR",
        text,
        "single-process store (SQLite) of watches and undelivered webhooks",
        unset="$XDG_DATA_HOME/comfy-relay or ~/.local/share/comfy-relay",
    )
    log_level: str = setting(
        "info",
        "RELAY_LOG_LEVEL",
        "--log-level",
        LOG_LEVELS.metavar,
        LOG_LEVELS,
        "least severe log lines written",
    )
    log_format: str = setting(
        "text",
        "RELAY_LOG_FORMAT",
        "--log-format",
        LOG_FORMATS.metavar,
        LOG_FORMATS,
        "log lines as text, or as one JSON object per line for log collectors",
    )

    @property
    def simulated(self) -> bool:
        """True when no upstream is configured and the relay polls its embedded simulator."""
        return self.upstream_url is None

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values of the secret settings that are set: logs must never show them."""
        values = (getattr(self, option.name) for option in OPTIONS if option.secret)
        return tuple(value for value in values if value)


OPTIONS: tuple[Option, ...] = tuple(
    Option(name=f.name, default=f.default, **f.metadata) for f in fields(Settings)
)


def read_options(
    options: tuple[Option, ...],
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """Parse the options given, by flag (raw values by option name) or else by environment.

    Options given neither way are left out. Raises ConfigError naming the flag or variable.
    """
    values: dict[str, Any] = {}
    for option in options:
        raw, source = flags.get(option.name), option.flag or option.name
        if raw is None:
            source, raw = next(((e, environ[e]) for e in option.env if environ.get(e)), ("", None))
        if raw is None:
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source} {exc}") from None
    return values


def load_settings(
    flags: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from raw flag values (by option name) and environment variables.

    Raises ConfigError with a one-line message naming the flag or variable at fault.
    """
    values = read_options(OPTIONS, flags or {}, environ or {})
    if values.get("signing", "apigw") == "apigw" and bool(values.get("access_key_id")) != bool(
        values.get("access_key_secret")
    ):
        raise ConfigError("RELAY_ACCESS_KEY_ID and RELAY_ACCESS_KEY_SECRET must be set together")
    workers = values.get("workers", 1)
    if workers > 1 and not values.get("redis_url"):
        raise ConfigError(
            f"--workers {workers} needs --redis (RELAY_REDIS_URL): each worker is a cluster node"
        )
    if workers > 1 and not values.get("upstream_url"):
        raise ConfigError(
            f"--workers {workers} needs --upstream (RELAY_UPSTREAM_URL): an embedded simulator"
            " would know only the tasks started on its own worker"
        )
    if values.get("redis_url") and not values.get("upstream_url"):
        raise ConfigError(
            "--redis (RELAY_REDIS_URL) needs --upstream (RELAY_UPSTREAM_URL): the nodes of a"
            " cluster share what they learn of each task, and an embedded simulator, one per"
            " node, would know only the tasks started on its own node"
        )
    if values.get("webhook_url") and not values.get("webhook_secret"):
        raise ConfigError(
            "RELAY_WEBHOOK_URL needs RELAY_WEBHOOK_SECRET: webhooks are always signed"
        )
    if (
        values.get("upstream_url")
        and values.get("signing", "apigw") == "apigw"
        and not values.get("access_key_id")
    ):
        raise ConfigError(
            "--upstream (RELAY_UPSTREAM_URL) needs RELAY_ACCESS_KEY_ID and"
            " RELAY_ACCESS_KEY_SECRET to sign its calls; to call it unsigned (`relay simulate`,"
            " say), give --signing none (RELAY_SIGNING=none)"
        )
    return Settings(**values)
