"""docs/asyncapi.yaml: valid to the official parser, and true to what the relay sends and reads.

The parser is `@asyncapi/parser` from npm (tests/node, installed by .ci/run with `npm ci
--prefix tests/node`), run by tests/node/asyncapi-summary.mjs, which prints the parsed
document's diagnostics and messages with their payloads resolved.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from functools import cache
from typing import Any, get_args

import httpx
import jsonschema
import pytest
import websockets
import yaml

from relay.openapi import openapi_document
from relay.protocol import ErrorCode, Event, EventKind
from relay.ws import ClientError, ClientMessage, parse_message

from .clients import recv_json, sse_events
from .conftest import SimulatedUpstream
from .node_tools import node_tools
from .servers import ROOT, ThreadServer

DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
NODE_DIR = ROOT / "tests" / "node"
# The client message's members, as parse_message reads them into ClientMessage's fields.
CLIENT_FIELDS = {"kind": "type", "task_id": "taskId", "last_seq": "lastSeq", "token": "token"}
SHARED_SCHEMAS = ("TaskState", "MergePatch", "End", "ErrorCode", "Error")


@cache
def parsed() -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("these tests need Node.js: apt-get install -y nodejs npm")
    node_tools()  # installs tests/node from its lockfile when missing
    done = subprocess.run(
        [node, str(NODE_DIR / "asyncapi-summary.mjs"), str(DOCUMENT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def messages(channel: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in parsed()["channels"][channel]["messages"]}


def payload(channel: str, name: str) -> dict[str, Any]:
    schema: dict[str, Any] = messages(channel)[name]["payload"]
    return schema


def test_the_official_parser_finds_no_error_and_no_warning() -> None:
    summary = parsed()
    problems = [d for d in summary["diagnostics"] if d["severity"] <= 1]
    assert problems == [], problems
    assert summary["version"] == "3.0.0"
    assert {c["address"] for c in summary["channels"].values()} == {
        "/v1/ws",
        "/v1/tasks/{taskId}/events",
        "/v1/events",
    }


def test_the_parser_rejects_a_broken_document(tmp_path: Any) -> None:
    """The summary script reports the parser's errors (so the test above can fail)."""
    broken = yaml.safe_load(DOCUMENT.read_text())
    broken["channels"]["socket"]["messages"]["subscribe"] = {"$ref": "#/components/messages/no"}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, str(NODE_DIR / "asyncapi-summary.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert any(d["severity"] == 0 for d in json.loads(done.stdout)["diagnostics"])


def test_the_relays_messages_are_the_documents() -> None:
    server_kinds = set(get_args(EventKind))
    assert set(messages("socket")) == server_kinds | {"subscribe", "unsubscribe"}
    for channel in ("taskEvents", "manyTaskEvents"):
        assert set(messages(channel)) == server_kinds
    operations = parsed()["operations"]
    assert operations["receiveSubscription"]["action"] == "receive"
    assert set(operations["receiveSubscription"]["messages"]) == {"subscribe", "unsubscribe"}
    assert set(operations["sendTaskEvents"]["messages"]) == server_kinds

    # The server's frames: the members Event.ws writes, for each kind.
    data: dict[str, dict[str, Any]] = {
        "snapshot": {"taskId": "t", "status": "running"},
        "patch": {"progress": 0.5},
        "end": {"status": "succeeded"},
        "error": {"code": "task_not_found", "message": "m", "retrying": False},
    }
    for kind in server_kinds:
        seq = None if kind == "error" else 7
        frame = json.loads(Event(kind, "t", seq, data[kind]).ws)
        schema = payload("socket", kind)
        assert set(frame) <= set(schema["properties"]), kind
        assert set(schema["required"]) <= set(frame), kind
        assert schema["properties"]["type"]["const"] == kind
        jsonschema.validate(frame, schema)

    # The client's messages: the members parse_message reads.
    assert set(ClientMessage._fields) == set(CLIENT_FIELDS)
    for kind in ("subscribe", "unsubscribe"):
        schema = payload("socket", kind)
        assert set(schema["properties"]) <= set(CLIENT_FIELDS.values()), kind
        for example in messages("socket")[kind]["examples"]:
            read = parse_message(json.dumps(example))
            assert (read.kind, read.task_id) == (kind, example["taskId"])
            assert read.last_seq == example.get("lastSeq")
    assert set(payload("socket", "subscribe")["properties"]) == set(CLIENT_FIELDS.values())
    with pytest.raises(ClientError):
        parse_message(json.dumps({"type": "other", "taskId": "t"}))

    codes = payload("socket", "error")["properties"]["data"]["properties"]["code"]["enum"]
    assert codes == [code.value for code in ErrorCode]


def test_every_message_example_fits_its_payload() -> None:
    for channel in parsed()["channels"].values():
        for message in channel["messages"]:
            for example in message["examples"]:
                jsonschema.validate(example, message["payload"])


def without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: without_descriptions(v) for k, v in schema.items() if k != "description"}
    return schema


def test_the_schemas_it_shares_with_openapi_are_the_same() -> None:
    """The same shapes; the prose may differ, each document speaking of its own routes."""
    asyncapi = yaml.safe_load(DOCUMENT.read_text())["components"]["schemas"]
    openapi = openapi_document(simulated=False)["components"]["schemas"]
    for name in SHARED_SCHEMAS:
        assert without_descriptions(asyncapi[name]) == without_descriptions(openapi[name]), name
    assert asyncapi["TaskId"]["pattern"] == openapi["TaskId"]["pattern"]


async def test_what_a_live_relay_sends_fits_the_document(
    relay: ThreadServer, upstream: SimulatedUpstream, http: httpx.AsyncClient
) -> None:
    """Every frame and event a relay sends for a task's whole life, and its errors."""
    task_id = upstream.start_task(queue=0.2, duration=0.8)
    seen: set[tuple[str, str]] = set()

    async def websocket() -> None:
        async with websockets.connect(f"{relay.ws_url}/v1/ws") as socket:
            await socket.send(json.dumps({"type": "subscribe", "taskId": "bad id"}))
            await socket.send(json.dumps({"type": "subscribe", "taskId": task_id}))
            while True:
                frame = await recv_json(socket)
                jsonschema.validate(frame, payload("socket", frame["type"]))
                seen.add(("socket", frame["type"]))
                if frame["type"] == "end":
                    return

    async def one_task() -> None:
        url = f"{relay.url}/v1/tasks/{task_id}/events"
        async for event in sse_events(http, url, strict=True):
            message = messages("taskEvents")[event.event]
            jsonschema.validate(event.data, message["payload"])
            if message["headers"] is not None:
                jsonschema.validate({"id": event.id}, message["headers"])
            seen.add(("taskEvents", event.event))

    async def many_tasks() -> None:
        url = f"{relay.url}/v1/events?taskId={task_id}&taskId=bad%20id"
        async for event in sse_events(http, url, strict=True):
            jsonschema.validate(event.data, payload("manyTaskEvents", event.event))
            seen.add(("manyTaskEvents", event.event))

    await asyncio.wait_for(asyncio.gather(websocket(), one_task(), many_tasks()), 20)
    for channel in ("socket", "taskEvents", "manyTaskEvents"):
        assert {(channel, kind) for kind in ("snapshot", "patch", "end")} <= seen, seen
    assert ("socket", "error") in seen and ("manyTaskEvents", "error") in seen

    async for event in sse_events(http, f"{relay.url}/v1/tasks/unknown-task/events"):
        jsonschema.validate(event.data, payload("taskEvents", event.event))
        assert event.event == "error" and event.id is None
