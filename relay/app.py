"""The relay as an ASGI application: routes, and the parts that live as long as the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from .budget import RateBudget
from .config import Settings
from .hub import Hub, TaskHub
from .limits import ConnectionLimit
from .metrics import Metrics
from .poll_loop import PollPolicy, poll_task
from .protocol import (
    ErrorCode,
    error_response,
    invalid_task_id_message,
    is_valid_task_id,
    task_id_in_path,
)
from .signing import make_signer
from .simulator import Simulator
from .sse import many_task_events, task_events
from .tokens import grant
from .upstream import (
    TaskNotFound,
    Unauthorized,
    UpstreamClient,
    UpstreamUnavailable,
    make_http_client,
)
from .ws import websocket_endpoint

logger = logging.getLogger("relay")

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = next(
    (p for p in (PACKAGE_DIR / "static", PACKAGE_DIR.parent / "static") if p.is_dir()),
    PACKAGE_DIR.parent / "static",
)
SIMULATOR_URL = "http://simulator.invalid"


class StateLookup:
    """`GET /v1/tasks/{id}` without a loop: one upstream call, shared by concurrent requests."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def fetch(self, task_id: str) -> dict[str, Any]:
        call = self._calls.get(task_id)
        if call is None:
            call = asyncio.ensure_future(self._upstream.progress(task_id))
            self._calls[task_id] = call
            call.add_done_callback(lambda _: self._calls.pop(task_id, None))
        return await asyncio.shield(call)


async def task_state(request: Request) -> Response:
    """`GET /v1/tasks/{taskId}`: the current state, from the running loop when there is one."""
    task_id = task_id_in_path(request.scope)
    if not is_valid_task_id(task_id):
        return error_response(400, ErrorCode.INVALID_TASK_ID, invalid_task_id_message(task_id))
    token = request.query_params.get("token")
    refusal = grant(request.app.state.settings.token_secret, token).refusal(task_id)
    if refusal is not None:
        return error_response(401, ErrorCode.UNAUTHORIZED, refusal)
    task: TaskHub | None = request.app.state.hub.get(task_id)
    if task is not None and task.state is not None:
        return JSONResponse(task.state, headers={"X-Relay-Seq": str(task.seq)})
    if task is not None and task.ended:
        return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown task {task_id}")
    cluster = request.app.state.cluster
    if cluster is not None and (stored := await cluster.stored_state(task_id)) is not None:
        seq, state = stored
        return JSONResponse(state, headers={"X-Relay-Seq": str(seq)})
    try:
        state = await request.app.state.lookup.fetch(task_id)
    except TaskNotFound:
        return error_response(404, ErrorCode.TASK_NOT_FOUND, f"unknown task {task_id}")
    except Unauthorized:
        return error_response(502, ErrorCode.UNAUTHORIZED, "the upstream refused the relay")
    except UpstreamUnavailable as exc:
        return error_response(503, ErrorCode.UPSTREAM_UNAVAILABLE, str(exc))
    return JSONResponse(state)


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
    """`/v1/tasks/{taskId}` and `/v1/tasks/{taskId}/events`, told apart on the raw path."""
    raw = (request.scope.get("raw_path") or request.url.path.encode()).split(b"?", 1)[0]
    if raw.endswith(b"/events"):
        return await task_events(request)
    return await task_state(request)


async def healthz(request: Request) -> Response:
    """Liveness; in cluster mode `degraded` while Redis is unreachable (still serving)."""
    cluster = request.app.state.cluster
    if cluster is not None and not cluster.healthy:
        return JSONResponse({"status": "degraded", "redis": "unreachable"})
    return JSONResponse({"status": "ok"})


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(settings: Settings) -> Starlette:
    """Build the relay; the upstream client, hub and loops start and stop with its lifespan."""
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
        )
        policy = PollPolicy(
            interval=settings.poll_interval,
            waiting_max=settings.waiting_interval_max,
            backoff_base=min(0.5, settings.poll_interval),
            backoff_max=settings.backoff_max,
            fetch_result=settings.fetch_result,
            request_timeout=settings.request_timeout,
        )

        cluster = None
        if settings.redis_url is not None:
            # Imported here so that a single relay never needs redis installed.
            from .cluster import Cluster, poll_task_clustered

            cluster = Cluster(settings.redis_url, settings.lease_ttl, metrics)
            clustered = cluster

            async def poll(task: TaskHub) -> None:
                await poll_task_clustered(task, clustered, upstream, policy, settings.linger)
        else:

            async def poll(task: TaskHub) -> None:
                await poll_task(task, upstream, policy)

        hub = Hub(
            poll,
            linger=settings.linger,
            ended_ttl=settings.ended_ttl,
            on_loops=metrics.loops_changed,
            on_subscribers=metrics.subscribers_changed,
        )
        metrics.watch(upstream.budget, hub)
        app.state.hub = hub
        app.state.cluster = cluster
        app.state.lookup = StateLookup(upstream)
        if cluster is not None:
            cluster.start(hub)
        try:
            yield
        finally:
            await hub.close()
            if cluster is not None:
                await cluster.close()
            await http.aclose()

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics.endpoint),
        Route("/v1/tasks/{rest:anytext}", task_route),
        Route("/v1/events", many_task_events),
        WebSocketRoute("/v1/ws", websocket_endpoint),
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
    middleware.append(Middleware(ConnectionLimit, limit=settings.max_connections))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.simulator = simulator
    app.state.cluster = None
    return app
