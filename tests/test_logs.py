"""Log lines: readable logger names, JSON for log collectors, and no secrets in either format."""

import json
import logging
import signal
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest

from relay.logs import JsonFormatter, TextFormatter, configure_logging, redactor

from .servers import ROOT, free_port

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrcyI6WyJhIl19.c2lnbmF0dXJl"


def record(
    message: str,
    *args: object,
    name: str = "relay.poll",
    level: int = logging.WARNING,
    task_id: str | None = None,
    exc_info: bool = False,
) -> logging.LogRecord:
    error = None
    if exc_info:
        try:
            raise RuntimeError("upstream exploded")
        except RuntimeError:
            error = sys.exc_info()
    made = logging.LogRecord(name, level, __file__, 1, message, args, error)
    if task_id is not None:
        made.task_id = task_id
    return made


def test_json_line_has_time_level_logger_and_message() -> None:
    line = JsonFormatter().format(record("retry %d in %.1fs", 2, 1.5))
    entry = json.loads(line)
    assert entry.keys() == {"time", "level", "logger", "message"}
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING",
        "relay.poll",
        "retry 2 in 1.5s",
    )
    assert entry["time"].endswith("Z")
    assert abs(datetime.fromisoformat(entry["time"]).timestamp() - time.time()) < 60
    assert "\n" not in line


def test_json_line_carries_the_task_id_when_the_record_has_one() -> None:
    entry = json.loads(JsonFormatter().format(record("upstream refused", task_id="task-a")))
    assert entry["task_id"] == "task-a"
    assert entry["message"] == "upstream refused"


def test_json_line_carries_the_exception_text() -> None:
    line = JsonFormatter().format(record("loop crashed", task_id="t1", exc_info=True))
    assert "\n" not in line  # one object per line, traceback and all
    entry = json.loads(line)
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert entry["exc_info"].endswith("RuntimeError: upstream exploded")
    assert entry["task_id"] == "t1"


def test_uvicorn_error_is_shown_as_uvicorn() -> None:
    info = record("connection open", name="uvicorn.error", level=logging.INFO)
    assert " INFO    uvicorn: connection open" in TextFormatter().format(info)
    assert json.loads(JsonFormatter().format(info))["logger"] == "uvicorn"
    assert info.name == "uvicorn.error"  # other handlers see the record as it was logged
    crash = record("boom", name="uvicorn.error", level=logging.ERROR)
    assert " ERROR   uvicorn: boom" in TextFormatter().format(crash)
    assert " relay.hub: " in TextFormatter().format(record("x", name="relay.hub"))


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_secrets_and_tokens_are_redacted(formatter: type[TextFormatter | JsonFormatter]) -> None:
    redact = redactor(["ak-s3cr3t", None, "t" * 40])
    line = formatter(redact).format(
        record(
            "GET /v1/tasks/a/events?token=%s&x=1 signed with %s, secret %s",
            TOKEN,
            "ak-s3cr3t",
            "t" * 40,
            exc_info=True,
        )
    )
    for secret in (TOKEN, "ak-s3cr3t", "t" * 40):
        assert secret not in line
    assert "?token=[redacted]&x=1" in line
    assert "signed with [redacted], secret [redacted]" in line


def test_redaction_covers_the_traceback_and_token_spellings() -> None:
    redact = redactor(["hunter2-hunter2"])
    try:
        raise ValueError("bad key hunter2-hunter2")
    except ValueError:
        failed = logging.LogRecord("relay", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    assert "hunter2" not in JsonFormatter(redact).format(failed)
    assert "hunter2" not in TextFormatter(redact).format(failed)
    assert redact("ws?TOKEN=abc.def ok") == "ws?TOKEN=[redacted] ok"
    assert redact("url='/v1/events?taskId=a&token=abc'") == (
        "url='/v1/events?taskId=a&token=[redacted]'"
    )
    assert redact("no secrets here") == "no secrets here"


def test_configure_logging_writes_json_to_stderr_and_quiets_httpx(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("httpx").level)
    try:
        configure_logging("info", "json", ["topsecret-value"])
        logging.getLogger("relay.poll").info("polled with topsecret-value", extra={"task_id": "a"})
        logging.getLogger("httpx").info("HTTP Request: POST http://upstream/ 200 OK")
        logging.getLogger("relay").debug("not at info")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("httpx").setLevel(saved[2])
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "time": json.loads(lines[0])["time"],
            "level": "INFO",
            "logger": "relay.poll",
            "message": "polled with [redacted]",
            "task_id": "a",
        }
    ]


def test_relay_serve_logs_json_lines_only() -> None:
    """Every line `relay serve --log-format json` writes to stderr is one JSON object."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--log-format", "json", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/sim/tasks", json={}, timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.status_code == 201
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM)
    assert out == ""
    entries = [json.loads(line) for line in err.splitlines()]
    assert len(entries) >= 3
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    loggers = {entry["logger"] for entry in entries}
    assert "uvicorn" in loggers and "relay" in loggers and "uvicorn.error" not in loggers
    assert f"http://127.0.0.1:{port}/" in entries[0]["message"]
    assert any(entry["message"] == "Application startup complete." for entry in entries)
