"""Settings: command-line flags win over environment variables, which win over defaults."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a value the relay cannot use; the message names the setting."""


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a positive number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number >= 0, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a number >= 0, got {raw!r}")
    return value


def fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number from 0 to 1, got {raw!r}") from None
    if not 0 <= value <= 1:
        raise ValueError(f"must be a number from 0 to 1, got {raw!r}")
    return value


def positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number >= 1, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"must be a whole number >= 1, got {raw!r}")
    return value


def port_number(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"must be a port number (0-65535), got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number (0-65535), got {raw!r}")
    return value


def http_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    return raw.strip().rstrip("/")


def redis_url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {raw!r}")
    return raw.strip()


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


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be 1 or 0 (true or false), got {raw!r}")


def signing_scheme(raw: str) -> str:
    if raw not in ("apigw", "none"):
        raise ValueError(f"must be 'apigw' or 'none', got {raw!r}")
    return raw


@dataclass(frozen=True)
class Option:
    """One setting as it can be given: its environment variables and its flag, if any."""

    name: str
    env: tuple[str, ...]
    flag: str | None
    parse: Callable[[str], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "upstream_url",
        ("RELAY_UPSTREAM_URL",),
        "--upstream",
        http_url,
        "base URL of the progress API (default: the embedded simulator)",
    ),
    Option("access_key_id", ("RELAY_ACCESS_KEY_ID",), None, text, "AccessKey ID"),
    Option("access_key_secret", ("RELAY_ACCESS_KEY_SECRET",), None, text, "AccessKey secret"),
    Option(
        "signing",
        ("RELAY_SIGNING",),
        "--signing",
        signing_scheme,
        "request signing: apigw (default) or none",
    ),
    Option(
        "poll_interval",
        ("RELAY_POLL_INTERVAL",),
        "--poll-interval",
        positive_float,
        "seconds between polls of a running task (default 1.0)",
    ),
    Option(
        "linger",
        ("RELAY_LINGER",),
        "--linger",
        non_negative_float,
        "seconds a loop lives on after its last subscriber left (default 2.0)",
    ),
    Option(
        "redis_url", ("RELAY_REDIS_URL",), "--redis", redis_url, "Redis URL: turns cluster mode on"
    ),
    Option(
        "allowed_origins",
        ("RELAY_ALLOWED_ORIGINS",),
        "--allowed-origins",
        origin_list,
        "CORS and WebSocket Origin allowlist, comma separated (default: same origin)",
    ),
    Option("port", ("RELAY_PORT", "PORT"), "--port", port_number, "listening port (default 8000)"),
    Option("host", ("RELAY_HOST",), "--host", text, "listening address (default 127.0.0.1)"),
    Option(
        "request_timeout",
        ("RELAY_REQUEST_TIMEOUT",),
        "--request-timeout",
        positive_float,
        "seconds before an upstream call counts as failed (default 10)",
    ),
    Option(
        "backoff_max",
        ("RELAY_BACKOFF_MAX",),
        "--backoff-max",
        positive_float,
        "longest wait between retries of a failing upstream (default 30)",
    ),
    Option(
        "upstream_concurrency",
        ("RELAY_UPSTREAM_CONCURRENCY",),
        "--upstream-concurrency",
        positive_int,
        "upstream calls in flight at once (default 32)",
    ),
    Option(
        "upstream_rate",
        ("RELAY_UPSTREAM_RATE",),
        "--upstream-rate",
        positive_float,
        "upstream calls per second across all tasks (default: no limit)",
    ),
    Option(
        "waiting_interval_max",
        ("RELAY_WAITING_INTERVAL_MAX",),
        "--waiting-interval-max",
        positive_float,
        "longest poll interval of a task waiting in the queue (default 5)",
    ),
    Option(
        "fetch_result",
        ("RELAY_FETCH_RESULT",),
        "--fetch-result",
        boolean,
        "add comfy_get_result's answer to a succeeded task's final state (default 1)",
    ),
    Option(
        "max_connections",
        ("RELAY_MAX_CONNECTIONS",),
        "--max-connections",
        positive_int,
        "open streams and WebSockets per process; more get 503 (default 10000)",
    ),
    Option(
        "lease_ttl",
        ("RELAY_LEASE_TTL",),
        "--lease-ttl",
        positive_float,
        "cluster mode: seconds a dead polling node's lease lasts before others take over (3)",
    ),
    Option(
        "ended_ttl",
        ("RELAY_ENDED_TTL",),
        "--ended-ttl",
        non_negative_float,
        "seconds an ended task's final state is kept for late subscribers (default 60)",
    ),
    Option(
        "max_stream_tasks",
        ("RELAY_MAX_STREAM_TASKS",),
        "--max-stream-tasks",
        positive_int,
        "task IDs allowed on one multiplexed SSE stream (default 32)",
    ),
    Option(
        "ping_interval",
        ("RELAY_PING_INTERVAL",),
        "--ping-interval",
        positive_float,
        "seconds between keep-alive comments on idle SSE streams (default 15)",
    ),
    Option(
        "send_timeout",
        ("RELAY_SEND_TIMEOUT",),
        "--send-timeout",
        positive_float,
        "seconds a client may take to accept one message before it is dropped (default 10)",
    ),
    Option(
        "token_secret",
        ("RELAY_TOKEN_SECRET",),
        None,
        text,
        "HS256 secret of subscription tokens: set, every subscription needs one (default: off)",
    ),
    Option(
        "max_ws_subscriptions",
        ("RELAY_MAX_WS_SUBSCRIPTIONS",),
        "--max-ws-subscriptions",
        positive_int,
        "task subscriptions on one WebSocket (default 100)",
    ),
    Option(
        "ws_max_size",
        ("RELAY_WS_MAX_SIZE",),
        "--ws-max-size",
        positive_int,
        "largest WebSocket message a client may send, in bytes; larger closes 1009 (default 65536)",
    ),
    Option(
        "ws_compression",
        ("RELAY_WS_COMPRESSION",),
        "--ws-compression",
        boolean,
        "offer permessage-deflate on WebSockets; costs CPU and memory per socket (default 0)",
    ),
    Option(
        "max_loops",
        ("RELAY_MAX_LOOPS",),
        "--max-loops",
        positive_int,
        "poll loops per process; subscriptions that need one more get overloaded (default 10000)",
    ),
)


@dataclass(frozen=True)
class Settings:
    upstream_url: str | None = None
    access_key_id: str | None = None
    access_key_secret: str | None = field(default=None, repr=False)
    signing: str = "apigw"
    poll_interval: float = 1.0
    linger: float = 2.0
    redis_url: str | None = None
    allowed_origins: tuple[str, ...] = ()
    port: int = 8000
    host: str = "127.0.0.1"
    request_timeout: float = 10.0
    backoff_max: float = 30.0
    upstream_concurrency: int = 32
    upstream_rate: float | None = None
    waiting_interval_max: float = 5.0
    fetch_result: bool = True
    max_connections: int = 10_000
    lease_ttl: float = 3.0
    ended_ttl: float = 60.0
    max_stream_tasks: int = 32
    ping_interval: float = 15.0
    send_timeout: float = 10.0
    token_secret: str | None = field(default=None, repr=False)
    max_ws_subscriptions: int = 100
    ws_max_size: int = 65_536
    ws_compression: bool = False
    max_loops: int = 10_000

    @property
    def simulated(self) -> bool:
        """True when no upstream is configured and the relay polls its embedded simulator."""
        return self.upstream_url is None


def load_settings(
    flags: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from raw flag values (by option name) and environment variables.

    Raises ConfigError with a one-line message naming the flag or variable at fault.
    """
    flags = flags or {}
    environ = environ or {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw, source = flags.get(option.name), option.flag or option.name
        if raw is None:
            source, raw = next(((e, environ[e]) for e in option.env if environ.get(e)), ("", None))
        if raw is None:
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source} {exc}") from None
    if values.get("signing", "apigw") == "apigw" and bool(values.get("access_key_id")) != bool(
        values.get("access_key_secret")
    ):
        raise ConfigError("RELAY_ACCESS_KEY_ID and RELAY_ACCESS_KEY_SECRET must be set together")
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})
