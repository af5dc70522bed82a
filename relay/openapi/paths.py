"""The document's paths: task state and streams, watches, operations, the simulator."""

from __future__ import annotations

from ..protocol import ErrorCode
from ..simulator import FAULT_KINDS
from .schemas import (
    API_KEY_REFUSED,
    ASYNCAPI_DOCUMENT,
    FAULT_SETTINGS,
    INVALID_TASK_ID,
    OVERLOADED,
    STORE_UNAVAILABLE,
    STREAM_HEADERS,
    TASK_ID_PARAMETER,
    TASK_NOT_FOUND,
    TOKEN_OPTIONAL,
    TOKEN_REFUSED,
    Schema,
    error,
    json_body,
    ref,
    resume_parameters,
    sse_content,
)


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
