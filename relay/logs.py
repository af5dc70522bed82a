"""The relay's log lines: readable logger names, text or JSON, and no secrets in either."""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LEVELS = ("debug", "info", "warning", "error")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# uvicorn logs everything as `uvicorn.error`, "connection open" included: under that name,
# grepping the logs for "error" would match every line.
SHOWN_NAMES = {"uvicorn.error": "uvicorn"}
# A subscription token travels in query strings (`?token=...`); whoever reads it from a log
# can watch the task until it expires.
TOKEN_IN_QUERY = re.compile(r"(?<=token=)[^&\s\"'#]+", re.IGNORECASE)
REDACTED = "[redacted]"


def redactor(secrets: Iterable[str | None]) -> Callable[[str], str]:
    """A function that blanks these secrets and query-string tokens out of a text."""
    # Longest first, so a secret that contains another is blanked whole.
    values = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def redact(text: str) -> str:
        for value in values:
            text = text.replace(value, REDACTED)
        return TOKEN_IN_QUERY.sub(REDACTED, text)

    return redact


def shown_url(url: str) -> str:
    """A URL for a log line, its password blanked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def about(task_id: str) -> dict[str, str]:
    """The `extra` of a log record about one task (a field of its own in JSON logs)."""
    return {"task_id": task_id}


def shown_name(name: str) -> str:
    return SHOWN_NAMES.get(name, name)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with the traceback below when there is one."""

    def __init__(self, redact: Callable[[str], str] | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self.redact = redact or redactor(())

    def format(self, record: logging.LogRecord) -> str:
        if record.name in SHOWN_NAMES:
            # A copy: other handlers (pytest's, for one) see the record as it was logged.
            record = copy.copy(record)
            record.name = shown_name(record.name)
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, task_id and exc_info if any."""

    def __init__(self, redact: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.redact = redact or redactor(())

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": shown_name(record.name),
            "message": self.redact(record.getMessage()),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exc_info"] = self.redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack_info"] = self.redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)


FORMATTERS: dict[str, type[TextFormatter | JsonFormatter]] = {
    "text": TextFormatter,
    "json": JsonFormatter,
}
FORMATS = tuple(FORMATTERS)


def configure_logging(level: str, fmt: str = "text", secrets: Iterable[str | None] = ()) -> None:
    """Send every log line of the process to stderr, in `fmt`, with `secrets` blanked out."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[fmt](redactor(secrets)))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO: one line per poll is noise, not news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
