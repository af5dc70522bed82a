"""The OpenAPI document: valid 3.1, true to the routes and webhooks, held to by schemathesis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute

from relay.app import create_app
from relay.config import Settings
from relay.openapi import openapi_document

from .clients import wait_for
from .conftest import FAST, SimulatedUpstream
from .servers import ROOT, ThreadServer
from .test_webhooks import API_KEY as WEBHOOK_API_KEY
from .test_webhooks import FAST_RETRY, Receiver, watch_settings

DOCS_COPY = ROOT / "docs" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# A value for each path parameter that the app's routes should accept.
SAMPLES = {"taskId": "9426842961cfedba8fd0cb39d", "file": "relay-client.js"}
API_KEY = "openapi-test-key"


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], path)


def operations(document: dict[str, Any], path: str) -> set[str]:
    return {method.upper() for method in document["paths"][path] if method in METHODS}


@pytest.mark.parametrize("simulated", [True, False])
def test_the_document_is_valid_openapi_3_1(simulated: bool) -> None:
    document = openapi_document(simulated=simulated)
    assert document["openapi"].startswith("3.1.")
    validate(document)


def test_the_copy_in_docs_is_the_document() -> None:
    """docs/openapi.json is made by `python -m relay.openapi > docs/openapi.json`."""
    assert json.loads(DOCS_COPY.read_text()) == openapi_document(simulated=True)
    made = subprocess.run(
        [sys.executable, "-m", "relay.openapi"], capture_output=True, text=True, check=True
    )
    assert made.stdout == DOCS_COPY.read_text()


@pytest.mark.parametrize("simulated", [True, False])
def test_every_route_is_documented_and_every_documented_path_is_routed(
    tmp_path: Path, simulated: bool
) -> None:
    upstream = None if simulated else "http://127.0.0.1:9"
    app = create_app(replace(FAST, upstream_url=upstream, data_dir=str(tmp_path)))
    assert isinstance(app, Starlette)
    document = openapi_document(simulated=simulated)
    http_routes = [r for r in app.routes if isinstance(r, Route | Mount)]
    served: dict[int, set[str]] = {id(route): set() for route in http_routes}
    for path in document["paths"]:
        methods = operations(document, path)
        url = concrete(path)
        if "101" in document["paths"][path].get("get", {}).get("responses", {}):
            assert any(
                isinstance(r, WebSocketRoute) and r.path_regex.fullmatch(url) for r in app.routes
            ), f"{path} is documented as a WebSocket upgrade, and no WebSocket route serves it"
        route = next((r for r in http_routes if r.path_regex.match(url)), None)
        assert route is not None, f"{path} is documented, and no route serves it"
        served[id(route)] |= methods
    for route in http_routes:
        documented = served[id(route)]
        assert documented, f"the route {route.path} is in no path of the document"
        if isinstance(route, Route) and route.methods is not None:
            assert route.methods - {"HEAD"} == documented - {"HEAD"}, route.path
    websockets = [r for r in app.routes if isinstance(r, WebSocketRoute)]
    assert websockets and all(
        "101" in document["paths"][r.path]["get"]["responses"] for r in websockets
    )
    assert ("/sim/tasks" in document["paths"]) == simulated


async def test_a_relay_serves_its_document(tmp_path: Path) -> None:
    simulated = ThreadServer(create_app(replace(FAST, data_dir=str(tmp_path)))).start()
    try:
        async with httpx.AsyncClient(base_url=simulated.url) as http:
            response = await http.get("/openapi.json")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert response.json() == openapi_document(simulated=True)
    finally:
        simulated.stop()


async def test_a_plain_get_of_the_websocket_endpoint_says_426(
    relay: ThreadServer, http: httpx.AsyncClient
) -> None:
    response = await http.get(relay.url + "/v1/ws")
    assert response.status_code == 426 and response.headers["upgrade"] == "websocket"
    assert response.json()["code"] == "bad_request"


async def test_a_405_names_the_methods_of_the_path_asked(
    relay: ThreadServer, http: httpx.AsyncClient
) -> None:
    """On every documented path: 405 for a method the document leaves out, with an `Allow`
    listing what it documents (one route serves all of `/v1/tasks/...`)."""
    document = openapi_document(simulated=False)  # the fixture's relay has its own upstream
    for path in document["paths"]:
        documented = operations(document, path)
        allow = documented | ({"HEAD"} if "GET" in documented else set())
        for method in ("POST", "DELETE", "PUT", "PATCH", "OPTIONS"):
            response = await http.request(method, relay.url + concrete(path))
            if method in documented:
                assert response.status_code != 405, (method, path)
            elif path.startswith("/static/") and response.status_code == 404:
                continue  # StaticFiles answers 404 before the method
            else:
                assert response.status_code == 405, (method, path, response.status_code)
                assert set(response.headers["allow"].split(", ")) == allow, (method, path)


def test_schemathesis_finds_nothing_on_a_live_relay(tmp_path: Path) -> None:
    """Every non-streaming operation, every check, on a relay with its embedded simulator.

    Left out: the streams and the WebSocket (no end to wait for), and the simulator's
    `POST /sim/faults`, whose purpose is to make the upstream fail, after which `503
    upstream_unavailable` is the right answer and the no-5xx check would call it a failure.
    """
    settings = replace(FAST, api_key=API_KEY, data_dir=str(tmp_path))
    server = ThreadServer(create_app(settings)).start()
    try:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "run",
                f"{server.url}/openapi.json",
                "--checks=all",
                "--max-examples=25",
                "--seed=21",
                "--generation-database=none",
                "--exclude-operation-id=streamTask",
                "--exclude-operation-id=streamTasks",
                "--exclude-operation-id=openWebSocket",
                "--exclude-operation-id=setSimulatorFaults",
                f"--header=Authorization: Bearer {API_KEY}",
                "--request-timeout=10",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=100,
            cwd=tmp_path,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert tested is not None and int(tested.group(1)) == 11, result.stdout[-3000:]


def test_the_settings_the_document_names_exist() -> None:
    """The document names settings by their variables; each must be one the relay reads."""
    text = json.dumps(openapi_document(simulated=True))
    variables = set(re.findall(r"RELAY_[A-Z_]+", text))
    known = {env for f in Settings.__dataclass_fields__.values() for env in f.metadata["env"]}
    assert variables and variables <= known, variables - known


def document_validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator of the schema at `pointer` in the document, its `$ref`s resolved there."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource(contents=document, specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"urn:openapi#{pointer}"}, registry=registry)


async def test_webhook_deliveries_fit_the_documents_webhooks(
    upstream: SimulatedUpstream, tmp_path: Path
) -> None:
    """task.changed and task.ended of a task watched to its end, and watch.expired of one
    watched past the watch TTL, each as the `webhooks` section describes it."""
    document = openapi_document(simulated=False)
    parameters = document["components"]["parameters"]
    webhooks = {
        event: document_validator(
            document, f"/webhooks/{name}/post/requestBody/content/application~1json/schema"
        )
        for event, name in [
            ("task.changed", "taskChanged"),
            ("task.ended", "taskEnded"),
            ("watch.expired", "watchExpired"),
        ]
    }
    receiver = Receiver()
    settings = watch_settings(
        upstream.url, receiver.url, tmp_path, webhook_events="all", watch_ttl=1.5
    )
    relay = ThreadServer(create_app(settings, webhook_retry=FAST_RETRY)).start()
    try:
        ending = upstream.start_task(queue=0.1, duration=0.5)
        outliving = upstream.start_task(queue=0, duration=60)
        auth = {"Authorization": f"Bearer {WEBHOOK_API_KEY}"}
        async with httpx.AsyncClient(base_url=relay.url, headers=auth) as http:
            for task_id in (ending, outliving):
                assert (await http.post(f"/v1/tasks/{task_id}/watch")).status_code == 202

        def types() -> set[str]:
            return {r.payload["type"] for r in receiver.delivered()}

        await wait_for(lambda: set(webhooks) <= types(), timeout=15)
    finally:
        relay.stop()
        receiver.stop()
    for received in receiver.delivered():
        assert received.payload is not None  # the signature held
        webhooks[received.payload["type"]].validate(received.payload)
        assert re.fullmatch(
            parameters["WebhookTimestamp"]["schema"]["pattern"].strip("^$"), received.timestamp
        )
        assert received.id.startswith("msg_")
