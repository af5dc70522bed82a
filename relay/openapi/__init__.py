"""The relay's HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Written once, in this package, from the names the code uses (`ErrorCode`,
`TASK_ID_PATTERN`, the stream headers): `schemas` (the components and error answers),
`paths` (every route) and `webhooks` (the deliveries to a backend). It is checked against
the app's routes and a live relay by the tests (tests/test_openapi.py); docs/openapi.json
is a copy of `openapi_document(simulated=True)`.
The WebSocket's messages are described in AsyncAPI, in docs/asyncapi.yaml.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from .paths import operation_paths, simulator_paths, task_paths, watch_paths
from .schemas import Schema, components
from .webhooks import webhooks


def openapi_document(*, simulated: bool) -> Schema:
    """The document; `simulated` adds the embedded simulator's control routes."""
    paths = {**task_paths(), **watch_paths(), **operation_paths()}
    if simulated:
        paths |= simulator_paths()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "comfy-relay",
            "version": __version__,
            "summary": "Push relay for ComfyUI task progress",
            "description": "Task state and its streams for browsers, watches and webhooks for "
            "backends, health and metrics for operators. The prose is docs/protocol.md.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "tasks"},
            {"name": "streams"},
            {"name": "watches"},
            {"name": "operations"},
            {"name": "demo"},
            {"name": "simulator", "description": "Only when no upstream is set."},
        ],
        "paths": paths,
        "webhooks": webhooks(),
        "components": components(),
    }


def openapi_route(*, simulated: bool) -> Route:
    """`GET /openapi.json`, made once."""
    document = JSONResponse(openapi_document(simulated=simulated)).body

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    return Route("/openapi.json", openapi)
