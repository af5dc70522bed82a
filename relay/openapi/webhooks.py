"""The document's webhooks: what the relay delivers to a backend's receiver."""

from __future__ import annotations

from ..protocol import ErrorCode
from .schemas import (
    Schema,
    json_body,
    ref,
)


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
