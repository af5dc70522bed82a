"""The relay's HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Written once, here, beside the names the code uses (`ErrorCode`, `TASK_ID_PATTERN`, the
stream headers), and checked against the app's routes and a live relay by the tests
(tests/test_openapi.py); docs/openapi.json is a copy of `openapi_document(simulated=True)`.
The WebSocket's messages are described in AsyncAPI, in docs/asyncapi.yaml.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .protocol import TASK_ID_PATTERN, ErrorCode
from .responses import RETRY_AFTER_SECONDS
from .simulator import FAULT_KINDS, Faults

Schema = dict[str, Any]

ASYNCAPI_DOCUMENT = "docs/asyncapi.yaml"
FAULT_SETTINGS = [name for name in Faults.__dataclass_fields__ if name != "script"]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def error(description: str, *codes: ErrorCode, retry_after: bool = False) -> Schema:
    """An error response: the shared `Error` body, with `code` narrowed to `codes`."""
    schema: Schema = {
        "allOf": [ref("Error"), {"properties": {"code": {"enum": [c.value for c in codes]}}}]
    }
    response: Schema = {"description": description, "content": json_body(schema)}
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


OVERLOADED = error(
    f"The relay is at its connection or poll-loop cap; `Retry-After: {RETRY_AFTER_SECONDS}`.",
    ErrorCode.OVERLOADED,
    retry_after=True,
)
INVALID_TASK_ID = error("The task ID fails the check.", ErrorCode.INVALID_TASK_ID)
TOKEN_REFUSED = error(
    "Tokens are on (`RELAY_TOKEN_SECRET`) and `token` does not allow the task.",
    ErrorCode.UNAUTHORIZED,
)
TASK_NOT_FOUND = error("The upstream does not know the task.", ErrorCode.TASK_NOT_FOUND)
API_KEY_REFUSED: Schema = {
    **error(
        "No `Authorization: Bearer <RELAY_API_KEY>`, another key, or `RELAY_API_KEY` unset.",
        ErrorCode.UNAUTHORIZED,
    ),
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
}
STORE_UNAVAILABLE = error(
    "At the poll-loop cap (`overloaded`, with `Retry-After`), or the store of watches "
    "cannot be reached (`internal_error`).",
    ErrorCode.OVERLOADED,
    ErrorCode.INTERNAL_ERROR,
)
STORE_UNAVAILABLE["headers"] = {
    "Retry-After": {"$ref": "#/components/headers/Retry-After-If-Overloaded"}
}
TASK_ID_PARAMETER: Schema = {"$ref": "#/components/parameters/TaskId"}
TOKEN_OPTIONAL: list[Schema] = [{}, {"taskToken": []}]

STREAM_HEADERS: Schema = {
    "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
    "X-Accel-Buffering": {
        "description": "Tells nginx not to buffer the stream.",
        "schema": {"type": "string", "const": "no"},
    },
}


def sse_content(description: str, wrapped: bool) -> Schema:
    """A `text/event-stream` body; `x-itemSchema` is OpenAPI 3.2's `itemSchema`: one event."""

    def event(name: str, data: Schema, with_id: bool = True) -> Schema:
        if wrapped:
            data = {
                "type": "object",
                "required": ["taskId", "data"],
                "properties": {"taskId": ref("TaskId"), "data": data},
            }
        properties: Schema = {"event": {"const": name}, "data": data}
        if with_id:
            properties["id"] = {"type": "string", "description": "The resume position."}
        return {"type": "object", "required": ["event", "data"], "properties": properties}

    item = {
        "oneOf": [
            event("snapshot", ref("TaskState")),
            event("patch", ref("MergePatch")),
            event("end", ref("End")),
            event("error", ref("Error"), with_id=wrapped),
        ]
    }
    return {
        "text/event-stream": {
            "schema": {"type": "string", "description": description},
            "x-itemSchema": item,
        }
    }


def resume_parameters() -> list[Schema]:
    return [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "The resume position EventSource sends when it reconnects; wins "
            "over `lastEventId`.",
            "schema": {"type": "string"},
        },
        {
            "name": "lastEventId",
            "in": "query",
            "description": "The resume position, for a page that opens a new stream itself.",
            "schema": {"type": "string"},
        },
    ]


def task_paths() -> dict[str, Schema]:
    return {
        "/v1/tasks/{taskId}": {
            "parameters": [TASK_ID_PARAMETER],
            "get": {
                "operationId": "getTaskState",
                "summary": "The task's current state",
                "tags": ["tasks"],
                "security": TOKEN_OPTIONAL,
                "responses": {
                    "200": {
                        "description": "The current state; `X-Relay-Seq` when it is numbered "
                        "(a loop's, a kept ended state, a cluster's stored one).",
                        "headers": {"X-Relay-Seq": {"$ref": "#/components/headers/X-Relay-Seq"}},
                        "content": json_body(ref("TaskState")),
                    },
                    "400": INVALID_TASK_ID,
                    "401": TOKEN_REFUSED,
                    "404": TASK_NOT_FOUND,
                    "502": error(
                        "The upstream refused the relay's credentials.", ErrorCode.UNAUTHORIZED
                    ),
                    "503": error(
                        "The upstream is unavailable (`upstream_unavailable`, no "
                        "`Retry-After`), or the relay is at its connection cap (`overloaded`, "
                        "with `Retry-After`).",
                        ErrorCode.UPSTREAM_UNAVAILABLE,
                        ErrorCode.OVERLOADED,
                    )
                    | {
                        "headers": {
                            "Retry-After": {
                                "$ref": "#/components/headers/Retry-After-If-Overloaded"
                            }
                        }
                    },
                },
            },
        },
        "/v1/tasks/{taskId}/events": {
            "parameters": [TASK_ID_PARAMETER],
            "get": {
                "operationId": "streamTask",
                "summary": "Server-Sent Events of one task",
                "description": "A snapshot first (unless resuming), then merge patches, then "
                "`end` or a final `error`; a `: ping` comment every `RELAY_PING_INTERVAL` "
                "seconds. Refusals come before the stream opens, in the order listed.",
                "tags": ["streams"],
                "security": TOKEN_OPTIONAL,
                "parameters": resume_parameters(),
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "headers": STREAM_HEADERS,
                        "content": sse_content("Events of one task.", wrapped=False),
                    },
                    "204": {"description": "The client holds the ended task's last state."},
                    "400": INVALID_TASK_ID,
                    "401": TOKEN_REFUSED,
                    "404": TASK_NOT_FOUND,
                    "503": OVERLOADED,
                },
            },
        },
        "/v1/events": {
            "get": {
                "operationId": "streamTasks",
                "summary": "Server-Sent Events of several tasks on one stream",
                "description": "Each event's data is `{taskId, data}`; its `id` lists "
                "`taskId:seq` for each task sent so far. An invalid or refused ID gets its own "
                "`error` event; one HTTP error only when no task can be watched.",
                "tags": ["streams"],
                "security": TOKEN_OPTIONAL,
                "parameters": [
                    {
                        "name": "taskId",
                        "in": "query",
                        "required": True,
                        "description": "Up to `RELAY_MAX_STREAM_TASKS` (32) task IDs.",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    },
                    *resume_parameters(),
                ],
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "headers": STREAM_HEADERS,
                        "content": sse_content("Events of several tasks.", wrapped=True),
                    },
                    "204": {"description": "Every task on the list ended, nothing left to send."},
                    "400": error(
                        "No `taskId`, too many, or every ID invalid.",
                        ErrorCode.BAD_REQUEST,
                        ErrorCode.TOO_MANY_TASKS,
                        ErrorCode.INVALID_TASK_ID,
                    ),
                    "401": error("The token refused every task.", ErrorCode.UNAUTHORIZED),
                    "404": error("Every task is known to be unknown.", ErrorCode.TASK_NOT_FOUND),
                    "503": OVERLOADED,
                },
            },
        },
        "/v1/ws": {
            "get": {
                "operationId": "openWebSocket",
                "summary": "The WebSocket upgrade",
                "description": "JSON text frames: `subscribe` and `unsubscribe` from the client, "
                f"`snapshot`, `patch`, `end` and `error` from the relay ({ASYNCAPI_DOCUMENT}). "
                "A token, when tokens are on, goes in each `subscribe`.",
                "tags": ["streams"],
                "parameters": [
                    {
                        "name": "Upgrade",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "const": "websocket"},
                    },
                ],
                "responses": {
                    "101": {"description": "Switching Protocols: the socket is open."},
                    "403": {"description": "The page's `Origin` is not allowed."},
                    "426": error(
                        "A plain HTTP request: this endpoint only takes WebSocket upgrades.",
                        ErrorCode.BAD_REQUEST,
                    )
                    | {
                        "headers": {"Upgrade": {"schema": {"type": "string", "const": "websocket"}}}
                    },
                    "503": OVERLOADED,
                },
            }
        },
    }


def watch_paths() -> dict[str, Schema]:
    bearer: list[Schema] = [{"apiKey": []}]
    return {
        "/v1/tasks/{taskId}/watch": {
            "parameters": [TASK_ID_PARAMETER],
            "post": {
                "operationId": "watchTask",
                "summary": "Watch a task to its end (server to server)",
                "description": "The relay polls the task until it ends and sends webhook "
                "events. The key is checked before the task ID.",
                "tags": ["watches"],
                "security": bearer,
                "responses": {
                    "202": {
                        "description": "The watch (the same one again if the task has one).",
                        "content": json_body(ref("Watch")),
                        "links": {
                            "CancelWatch": {
                                "operationId": "cancelWatch",
                                "parameters": {"taskId": "$response.body#/taskId"},
                            }
                        },
                    },
                    "400": INVALID_TASK_ID,
                    "401": API_KEY_REFUSED,
                    "503": STORE_UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "cancelWatch",
                "summary": "Stop watching a task; no event is sent",
                "tags": ["watches"],
                "security": bearer,
                "responses": {
                    "204": {"description": "Not watched now, whether it was or not."},
                    "400": INVALID_TASK_ID,
                    "401": API_KEY_REFUSED,
                    "503": error(
                        "The store of watches cannot be reached.", ErrorCode.INTERNAL_ERROR
                    ),
                },
            },
        },
        "/v1/watches": {
            "get": {
                "operationId": "listWatches",
                "summary": "Every watch held (in cluster mode, the cluster's), oldest first",
                "tags": ["watches"],
                "security": bearer,
                "responses": {
                    "200": {
                        "description": "The watches.",
                        "content": json_body(
                            {
                                "type": "object",
                                "required": ["watches"],
                                "properties": {"watches": {"type": "array", "items": ref("Watch")}},
                            }
                        ),
                    },
                    "401": API_KEY_REFUSED,
                    "503": error(
                        "The store of watches cannot be reached.", ErrorCode.INTERNAL_ERROR
                    ),
                },
            }
        },
    }


def operation_paths() -> dict[str, Schema]:
    return {
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness; never counted against the connection cap",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "`degraded` while a cluster node cannot reach Redis "
                        "(still serving).",
                        "content": json_body(ref("Health")),
                    }
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics; never counted against the connection cap",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "The text exposition format, version 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": json_body({"type": "object"}),
                    }
                },
            }
        },
        "/": {
            "get": {
                "operationId": "demoPage",
                "summary": "The demo page",
                "tags": ["demo"],
                "responses": {
                    "200": {
                        "description": "HTML.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/static/{file}": {
            "get": {
                "operationId": "staticFile",
                "summary": "The demo page's files and the browser client, `relay-client.js`",
                "tags": ["demo"],
                "parameters": [
                    {
                        "name": "file",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "examples": {"client": {"value": "relay-client.js"}},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {"*/*": {"schema": {"type": "string"}}},
                    },
                    "404": {
                        "description": "No such file.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            }
        },
    }


def simulator_paths() -> dict[str, Schema]:
    """The embedded simulator's control routes (relay/simulator.py)."""
    bad_request: Schema = {
        "description": "The body cannot be read.",
        "content": json_body(
            {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"const": "bad_request"}, "message": {"type": "string"}},
            }
        ),
    }
    return {
        "/sim/tasks": {
            "post": {
                "operationId": "startSimulatedTask",
                "summary": "Start a simulated task",
                "tags": ["simulator"],
                "requestBody": {
                    "required": False,
                    "content": json_body(
                        {
                            "type": "object",
                            "properties": {
                                "queue": {
                                    "type": ["number", "null"],
                                    "minimum": 0,
                                    "maximum": 3600,
                                    "description": "Seconds queued; absent: the back of the queue.",
                                },
                                "duration": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "maximum": 3600,
                                    "default": 20,
                                },
                                "fail": {
                                    "type": ["boolean", "null"],
                                    "description": "Absent: fails at the fail rate.",
                                },
                            },
                        }
                    ),
                },
                "responses": {
                    "201": {
                        "description": "The task started.",
                        "content": json_body(
                            {
                                "type": "object",
                                "required": ["taskId"],
                                "properties": {"taskId": ref("TaskId")},
                            }
                        ),
                        "links": {
                            "GetTaskState": {
                                "operationId": "getTaskState",
                                "parameters": {"taskId": "$response.body#/taskId"},
                            },
                            "WatchTask": {
                                "operationId": "watchTask",
                                "parameters": {"taskId": "$response.body#/taskId"},
                            },
                        },
                    },
                    "400": bad_request,
                },
            }
        },
        "/sim/stats": {
            "get": {
                "operationId": "simulatorStats",
                "summary": "Upstream calls counted by the simulator",
                "tags": ["simulator"],
                "responses": {
                    "200": {
                        "description": "Calls per task and in total.",
                        "content": json_body(
                            {
                                "type": "object",
                                "required": ["calls", "total", "byStatus", "inFlight", "refused"],
                                "properties": {
                                    "calls": {"type": "object"},
                                    "total": {"type": "integer"},
                                    "byStatus": {"type": "object"},
                                    "inFlight": {"type": "integer"},
                                    "refused": {"type": "object"},
                                },
                            }
                        ),
                    }
                },
            }
        },
        "/sim/faults": {
            "post": {
                "operationId": "setSimulatorFaults",
                "summary": "Make the simulated upstream misbehave (shares, seconds, a script)",
                "tags": ["simulator"],
                "requestBody": {
                    "required": False,
                    "content": json_body(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                **{
                                    name: {"type": "number", "minimum": 0}
                                    for name in FAULT_SETTINGS
                                },
                                "script": {
                                    "type": ["array", "null"],
                                    "description": "Faults for the next calls, in order.",
                                    "items": {"enum": ["ok", *FAULT_KINDS]},
                                },
                            },
                        }
                    ),
                },
                "responses": {
                    "200": {
                        "description": "The faults are set.",
                        "content": json_body(
                            {"type": "object", "properties": {"ok": {"const": True}}}
                        ),
                    },
                    "400": bad_request,
                },
            }
        },
        "/sim/images/{taskId}.svg": {
            "get": {
                "operationId": "simulatedImage",
                "summary": "A finished simulated task's picture",
                "tags": ["simulator"],
                "parameters": [
                    {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "An SVG picture.",
                        "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                    },
                    "404": {"description": "No such simulated task."},
                },
            }
        },
    }


def webhook(summary: str, event_type: str, data: Schema) -> Schema:
    return {
        "post": {
            "summary": summary,
            "description": "POSTed to `RELAY_WEBHOOK_URL`, signed as Standard Webhooks says. "
            "The same `webhook-id` and body on every attempt: drop an ID already handled.",
            "parameters": [
                {"$ref": "#/components/parameters/WebhookId"},
                {"$ref": "#/components/parameters/WebhookTimestamp"},
                {"$ref": "#/components/parameters/WebhookSignature"},
            ],
            "requestBody": {
                "required": True,
                "content": json_body(
                    {
                        "type": "object",
                        "required": ["type", "timestamp", "data"],
                        "properties": {
                            "type": {"const": event_type},
                            "timestamp": {
                                "type": "string",
                                "format": "date-time",
                                "description": "When the event was made.",
                            },
                            "data": data,
                        },
                    }
                ),
            },
            "responses": {
                "2XX": {"description": "Delivered."},
                "408": {"description": "Retried, with capped exponential backoff and jitter."},
                "429": {
                    "description": "Retried, no sooner than `Retry-After` asks.",
                    "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                },
                "5XX": {"description": "Retried, no sooner than a `Retry-After` asks."},
                "default": {"description": "Any other answer is final: the event is dropped."},
            },
        }
    }


def webhooks() -> dict[str, Schema]:
    seq: Schema = {"type": ["integer", "null"], "description": "The state's sequence number."}
    task_id = ref("TaskId")
    return {
        "taskEnded": webhook(
            "task.ended: the watched task ended",
            "task.ended",
            {
                "type": "object",
                "required": ["taskId", "seq", "status"],
                "properties": {
                    "taskId": task_id,
                    "seq": seq,
                    "status": {
                        "enum": [
                            "succeeded",
                            "failed",
                            ErrorCode.TASK_NOT_FOUND.value,
                            ErrorCode.UNAUTHORIZED.value,
                            ErrorCode.INTERNAL_ERROR.value,
                        ],
                        "description": "`succeeded`, `failed`, or the final error's code.",
                    },
                    "state": ref("TaskState"),
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": ref("ErrorCode"), "message": {"type": "string"}},
                    },
                },
            },
        ),
        "taskChanged": webhook(
            "task.changed: a change before the end (`RELAY_WEBHOOK_EVENTS=all`)",
            "task.changed",
            {
                "type": "object",
                "required": ["taskId", "seq"],
                "properties": {
                    "taskId": task_id,
                    "seq": {"type": "integer"},
                    "state": ref("TaskState"),
                    "patch": ref("MergePatch"),
                },
                "oneOf": [{"required": ["state"]}, {"required": ["patch"]}],
            },
        ),
        "watchExpired": webhook(
            "watch.expired: the watch outlived `RELAY_WATCH_TTL`",
            "watch.expired",
            {
                "type": "object",
                "required": ["taskId", "seq"],
                "properties": {"taskId": task_id, "seq": seq, "state": ref("TaskState")},
            },
        ),
    }


def components() -> Schema:
    return {
        "schemas": {
            "TaskId": {
                "type": "string",
                "pattern": f"^{TASK_ID_PATTERN.pattern}$",
                "examples": ["9426842961cfedba8fd0cb39d"],
            },
            "TaskState": {
                "type": "object",
                "description": "The upstream's `data`, passed on whole without `null` members. "
                "`status` is `waiting`, `running`, `succeeded` or `failed`; `result` comes "
                "with a succeeded task's final state.",
                "properties": {
                    "taskId": {"type": "string"},
                    "status": {"type": "string"},
                    "progress": {"type": "number"},
                    "etaRelative": {"type": "number"},
                    "message": {"type": "string"},
                    "lastQueueRemaining": {"type": "number"},
                    "state": {"type": "object"},
                    "result": {"type": "object"},
                },
            },
            "MergePatch": {
                "type": "object",
                "description": "An RFC 7396 merge patch from the state before; `null` removes a "
                "member.",
            },
            "End": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"enum": ["succeeded", "failed"]}},
            },
            "ErrorCode": {"enum": [code.value for code in ErrorCode]},
            "Error": {
                "type": "object",
                "description": "An HTTP error body, and the data of an `error` event: "
                "`retrying: false` is final.",
                "required": ["code", "message", "retrying"],
                "properties": {
                    "code": ref("ErrorCode"),
                    "message": {"type": "string"},
                    "retrying": {"type": "boolean"},
                },
            },
            "Watch": {
                "type": "object",
                "required": ["taskId", "id", "createdAt", "expiresAt"],
                "properties": {
                    "taskId": ref("TaskId"),
                    "id": {"type": "string", "description": "Names the watch in `webhook-id`s."},
                    "createdAt": {"type": "number", "description": "Unix seconds."},
                    "expiresAt": {"type": "number", "description": "Unix seconds."},
                },
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"enum": ["ok", "degraded"]},
                    "redis": {"const": "unreachable"},
                },
            },
        },
        "parameters": {
            "TaskId": {
                "name": "taskId",
                "in": "path",
                "required": True,
                "description": "Read from the raw path, then percent-decoded.",
                "schema": ref("TaskId"),
            },
            "WebhookId": {
                "name": "webhook-id",
                "in": "header",
                "required": True,
                "description": "`msg_<watch id>_end`, or `msg_<watch id>_<seq>` for a change.",
                "schema": {"type": "string"},
            },
            "WebhookTimestamp": {
                "name": "webhook-timestamp",
                "in": "header",
                "required": True,
                "description": "When this attempt was sent, Unix seconds.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "WebhookSignature": {
                "name": "webhook-signature",
                "in": "header",
                "required": True,
                "description": "`v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` "
                "under the base64-decoded `whsec_` secret (`RELAY_WEBHOOK_SECRET`).",
                "schema": {"type": "string", "pattern": "^v1,"},
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "Retry-After-If-Overloaded": {
                "description": "Seconds to wait before trying again; with `overloaded` only.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "X-Relay-Seq": {
                "description": "The state's sequence number.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        },
        "securitySchemes": {
            "taskToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "An HS256 JWT naming the tasks it allows (`tasks`, `exp`); needed "
                "only when the relay sets `RELAY_TOKEN_SECRET`.",
            },
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "`RELAY_API_KEY`, for the server-to-server watch API.",
            },
        },
    }


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


if __name__ == "__main__":
    # docs/openapi.json: python -m relay.openapi > docs/openapi.json
    print(json.dumps(openapi_document(simulated=True), indent=2, ensure_ascii=False))
