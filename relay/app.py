"""The relay as an ASGI application: routes, and the parts that live as long as the server."""

from __future__ import annotations

import hmac
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote

import httpx
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute, request_response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .backend import Backend, LocalBackend
from .config import Settings
from .hub import Hub, LoopSignal, TaskHub
from .limits import ConnectionLimit
from .metrics import Metrics
from .openapi import openapi_route
from .poll_loop import PollPolicy, poll_task
from .protocol import (
    ErrorCode,
    invalid_task_id_message,
    is_valid_task_id,
    task_id_in_path,
)
from .responses import error_response, overloaded_response, refusal_response
from .service import OVERLOADED_MESSAGE, Relay, StateLookup, relay_of
from .simulator import Simulator
from .sse import many_task_events, task_events
from .upstream import (
    RateBudget,
    TaskNotFound,
    Unauthorized,
    UpstreamClient,
    UpstreamUnavailable,
    make_http_client,
    make_signer,
)
from .watchdog import Watchdog
from .watches import (
    DataDirInUse,
    RetryPolicy,
    SqliteStore,
    Watches,
    WatchStore,
    Webhooks,
    default_data_dir,
)
from .ws import websocket_endpoint

logger = logging.getLogger("relay")

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = next(
    (p for p in (PACKAGE_DIR / "static", PACKAGE_DIR.parent / "static") if p.is_dir()),
    PACKAGE_DIR.parent / "static",
)
SIMULATOR_URL = "http://simulator.invalid"


async def task_state(request: Request) -> Response:
    """`GET /v1/tasks/{taskId}`: the current state, with `X-Relay-Seq` when it is numbered."""
    relay = relay_of(request)
    task_id = task_id_in_path(request.scope)
    refusal = relay.refuse(task_id, request.query_params.get("token"))
    if refusal is not None:
        return refusal_response(refusal)
    try:
        state, seq = await relay.current_state(task_id)
    except TaskNotFound as exc:
        return error_response(404, ErrorCode.TASK_NOT_FOUND, str(exc))
    except Unauthorized:
        return error_response(502, ErrorCode.UNAUTHORIZED, "the upstream refused the relay")
    except UpstreamUnavailable as exc:
        return error_response(503, ErrorCode.UPSTREAM_UNAVAILABLE, str(exc))
    headers = {"X-Relay-Seq": str(seq)} if seq is not None else None
    return JSONResponse(state, headers=headers)


class AnyTextConvertor(Convertor[str]):
    """Starlette's `path`, newlines included, so that every `/v1/tasks/...` reaches
    `task_route` and a bad ID gets `invalid_task_id`, not a plain-text 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", AnyTextConvertor())


async def task_route(request: Request) -> Response:
    """`/v1/tasks/{taskId}`, `/v1/tasks/{taskId}/events` and `/v1/tasks/{taskId}/watch`, told
    apart on the raw path."""
    raw = (request.scope.get("raw_path") or request.url.path.encode()).split(b"?", 1)[0]
    segment = raw.decode("latin-1").removeprefix("/v1/tasks/")
    if segment.endswith("/watch"):
        return await task_watch(request, unquote(segment[: -len("/watch")], errors="replace"))
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed("GET, HEAD")
    if raw.endswith(b"/events"):
        return await task_events(request)
    return await task_state(request)


class EveryMethod:
    """A request-response endpoint as an ASGI app, so that its `Route` takes every method."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def method_not_allowed(allow: str) -> Response:
    return PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": allow})


def api_refusal(request: Request) -> Response | None:
    """`401` unless the request carries `Authorization: Bearer <RELAY_API_KEY>` (server API)."""
    key = relay_of(request).settings.api_key
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if (
        key is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), key.encode())
    ):
        return None
    message = (
        "the server API is off (RELAY_API_KEY is not set)"
        if key is None
        else "the server API needs Authorization: Bearer <RELAY_API_KEY>"
    )
    response = error_response(401, ErrorCode.UNAUTHORIZED, message)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def store_unavailable(exc: Exception) -> Response:
    logger.warning("watch store unavailable: %s", exc)
    return error_response(
        503, ErrorCode.INTERNAL_ERROR, "the relay cannot reach its store of watches; retry"
    )


async def task_watch(request: Request, task_id: str) -> Response:
    """`POST` (watch) and `DELETE` (cancel) `/v1/tasks/{taskId}/watch`: the server API."""
    if request.method not in ("POST", "DELETE"):
        return method_not_allowed("POST, DELETE")
    refusal = api_refusal(request)
    if refusal is not None:
        return refusal
    if not is_valid_task_id(task_id):
        return error_response(400, ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id))
    watches = relay_of(request).watches
    assert watches is not None  # made whenever the API key is set
    try:
        if request.method == "DELETE":
            await watches.cancel(task_id)
            return Response(status_code=204)
        watch = await watches.watch(task_id)
    except Exception as exc:
        return store_unavailable(exc)
    if watch is None:
        return overloaded_response(OVERLOADED_MESSAGE)
    return JSONResponse(watch.public(), status_code=202)


async def list_watches(request: Request) -> Response:
    """`GET /v1/watches`: every watch (in cluster mode, the cluster's)."""
    refusal = api_refusal(request)
    if refusal is not None:
        return refusal
    watches = relay_of(request).watches
    assert watches is not None
    try:
        listed = await watches.list()
    except Exception as exc:
        return store_unavailable(exc)
    return JSONResponse({"watches": [watch.public() for watch in listed]})


async def healthz(request: Request) -> Response:
    """Liveness; in cluster mode `degraded` while Redis is unreachable (still serving)."""
    if not relay_of(request).backend.healthy:
        return JSONResponse({"status": "degraded", "redis": "unreachable"})
    return JSONResponse({"status": "ok"})


async def upgrade_required(request: Request) -> Response:
    """`/v1/ws` over plain HTTP: say what the endpoint takes, rather than a bare 404."""
    message = "/v1/ws takes only WebSocket upgrades"
    response = error_response(426, ErrorCode.BAD_REQUEST, message)
    response.headers["Upgrade"] = "websocket"
    return response


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def open_store(settings: Settings) -> WatchStore:
    """Where watches and undelivered webhooks are kept: Redis in a cluster, else SQLite."""
    if settings.redis_url is not None:
        from .watches.redis_store import RedisWatchStore

        return RedisWatchStore(settings.redis_url, settings.lease_ttl)
    directory = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    try:
        store = await SqliteStore.open(directory)
    except DataDirInUse as exc:
        logger.error("%s", exc)
        raise
    except (OSError, sqlite3.Error) as exc:
        logger.error("cannot open the data directory %s: %s", directory, exc)
        raise
    logger.info("watches and undelivered webhooks are kept in %s", directory)
    return store


def create_app(settings: Settings, *, webhook_retry: RetryPolicy | None = None) -> Starlette:
    """Build the relay; the upstream client, hub and loops start and stop with its lifespan.

    `webhook_retry` replaces the webhooks' retry schedule (tests use a faster one).
    """
    metrics = Metrics()
    simulator = Simulator() if settings.simulated else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        transport = httpx.ASGITransport(app=simulator.app) if simulator is not None else None
        http = make_http_client(
            settings.request_timeout, settings.upstream_concurrency, transport=transport
        )
        signer = make_signer(settings.signing, settings.access_key_id, settings.access_key_secret)
        upstream = UpstreamClient(
            http,
            settings.upstream_url or SIMULATOR_URL,
            signer,
            settings.upstream_concurrency,
            on_call=metrics.upstream_call,
            budget=RateBudget(settings.upstream_rate),
            links_relative_to_relay=simulator is not None,
        )
        policy = PollPolicy(
            interval=settings.poll_interval,
            waiting_max=settings.waiting_interval_max,
            backoff_base=min(0.5, settings.poll_interval),
            backoff_max=settings.backoff_max,
            fetch_result=settings.fetch_result,
            request_timeout=settings.request_timeout,
        )

        backend: Backend = LocalBackend()
        if settings.redis_url is not None:
            # Imported here so that a single relay never needs redis installed.
            from .cluster import RedisBackend

            cluster = RedisBackend(settings.redis_url, settings.lease_ttl, metrics)
            logger.info("cluster mode, node ID %s", cluster.node_id)
            metrics.watch_redis(cluster)
            backend = cluster
        chosen = backend

        async def poll(task: TaskHub, signal: LoopSignal) -> None:
            await poll_task(task, signal, chosen, upstream, policy)

        hub = Hub(
            poll,
            linger=settings.linger,
            ended_ttl=settings.ended_ttl,
            on_loops=metrics.loops_changed,
            on_subscribers=metrics.subscribers_changed,
        )
        metrics.watch(upstream.budget, hub)
        lookup = StateLookup(upstream)
        store: WatchStore | None = None
        watches: Watches | None = None
        webhooks: Webhooks | None = None
        if settings.api_key is not None or settings.webhook_url is not None:
            store = await open_store(settings)
            if settings.webhook_url is not None and settings.webhook_secret is not None:
                webhooks = Webhooks(
                    store,
                    settings.webhook_url,
                    settings.webhook_secret,
                    policy=webhook_retry,
                    on_attempt=metrics.webhook_attempt,
                )
            watches = Watches(
                hub,
                store,
                ttl=settings.watch_ttl,
                events=settings.webhook_events,
                max_loops=settings.max_loops,
                interval=min(1.0, backend.check_interval),
                notify=webhooks.wake if webhooks is not None else None,
                backlogged=webhooks.backlogged if webhooks is not None else lambda: False,
            )
            metrics.watch_webhooks(watches, webhooks)
        watchdog = Watchdog(
            ping_interval=settings.ping_interval, send_timeout=settings.send_timeout
        )
        metrics.resets.counts = lambda: watchdog.resets
        app.state.relay = Relay(
            settings, hub, backend, upstream, metrics, lookup, watchdog, watches=watches
        )
        backend.start(hub.receive, hub.wake)
        if webhooks is not None:
            webhooks.start()
        if watches is not None:
            watches.start()
        try:
            yield
        finally:
            if watches is not None:
                await watches.close()
            await hub.close()
            if webhooks is not None:
                await webhooks.close()
            if store is not None:
                await store.close()
            await lookup.close()
            await backend.close()
            await http.aclose()

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics.endpoint),
        # Every method reaches task_route, whose 405 names the methods of the path asked.
        Route("/v1/tasks/{rest:anytext}", EveryMethod(task_route)),
        Route("/v1/watches", list_watches),
        Route("/v1/events", many_task_events),
        WebSocketRoute("/v1/ws", websocket_endpoint),
        Route("/v1/ws", upgrade_required),
        openapi_route(simulated=simulator is not None),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    if simulator is not None:
        routes += simulator.control_routes()
    middleware = []
    if settings.allowed_origins:
        # Outermost, so that even a refusal carries the CORS headers a page needs to read it.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET"],
                allow_headers=["Last-Event-ID"],
                expose_headers=["Retry-After", "X-Relay-Seq"],
                max_age=600,
            )
        )
    middleware.append(
        Middleware(
            ConnectionLimit,
            limit=settings.max_connections,
            counted=metrics.connections_changed,
        )
    )
    metrics.caps(settings.max_connections, settings.max_loops)
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.simulator = simulator
    app.state.settings = settings
    return app
