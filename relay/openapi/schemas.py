"""The pieces of the document: schemas, error answers, parameters, and `components`."""

from __future__ import annotations

from typing import Any

from ..protocol import TASK_ID_PATTERN, ErrorCode
from ..responses import RETRY_AFTER_SECONDS
from ..simulator import Faults

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
