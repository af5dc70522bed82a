"""The `relay` command: flags over environment over defaults, one-line errors, help, first
log line, and the settings documented from their declarations."""

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cli import SIMULATE_OPTIONS, TOKEN_OPTIONS, WATCH_OPTIONS, main
from relay.config import (
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    fraction,
    load_settings,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)

from .servers import ROOT, ProcessServer


def test_defaults_match_the_spec() -> None:
    settings = load_settings({}, {})
    assert settings == Settings()
    assert (settings.poll_interval, settings.linger, settings.port, settings.host) == (
        1.0,
        2.0,
        8000,
        "127.0.0.1",
    )
    assert settings.simulated and settings.redis_url is None and settings.allowed_origins == ()


def test_every_setting_can_be_given_by_environment() -> None:
    assert {option.name for option in OPTIONS} == {f.name for f in fields(Settings)}
    assert all(option.env for option in OPTIONS)


def test_each_setting_is_declared_once_on_its_field() -> None:
    defaults = Settings()
    for option in OPTIONS:
        assert getattr(defaults, option.name) == option.default, option.name
        assert option.help and option.metavar and "VALUE" not in option.metavar, option.name
    secret = {option.name for option in OPTIONS if option.secret}
    assert secret == {"access_key_secret", "token_secret", "api_key", "webhook_secret"}
    assert {f.name for f in fields(Settings) if not f.repr} == secret
    settings = Settings(access_key_secret="ak-secret", token_secret="t" * 32)
    assert settings.secrets == ("ak-secret", "t" * 32)


@pytest.mark.parametrize(
    ("parse", "raw", "error"),
    [
        (positive_float, "0", "must be a positive number, got '0'"),
        (positive_float, "nan", "must be a positive number, got 'nan'"),
        (non_negative_float, "-1", "must be a number >= 0, got '-1'"),
        (non_negative_float, "inf", "must be a number >= 0, got 'inf'"),
        (fraction, "1.5", "must be a number from 0 to 1, got '1.5'"),
        (positive_int, "1.5", "must be a whole number >= 1, got '1.5'"),
        (positive_int, "0", "must be a whole number >= 1, got '0'"),
        (port_number, "70000", "must be a whole number from 0 to 65535, got '70000'"),
    ],
)
def test_bounded_numbers_say_which_numbers_they_take(
    parse: Callable[[str], Any], raw: str, error: str
) -> None:
    with pytest.raises(ValueError) as raised:
        parse(raw)
    assert str(raised.value) == error


def test_bounded_numbers_take_their_bounds() -> None:
    assert (non_negative_float("0"), fraction("0"), fraction("1")) == (0.0, 0.0, 1.0)
    assert (positive_int("1"), port_number("0"), port_number("65535")) == (1, 0, 65535)
    assert positive_float(" 0.25 ") == 0.25


def test_log_settings() -> None:
    assert (Settings().log_level, Settings().log_format) == ("info", "text")
    settings = load_settings({}, {"RELAY_LOG_LEVEL": "WARNING", "RELAY_LOG_FORMAT": "json"})
    assert (settings.log_level, settings.log_format) == ("warning", "json")
    assert load_settings({"log_level": "debug"}, {"RELAY_LOG_LEVEL": "error"}).log_level == "debug"
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"RELAY_LOG_FORMAT": "xml"})
    assert str(raised.value) == "RELAY_LOG_FORMAT must be one of text, json, got 'xml'"


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"RELAY_POLL_INTERVAL": "0.5", "RELAY_LINGER": "4", "PORT": "9000"}
    assert load_settings({}, env).poll_interval == 0.5
    assert load_settings({}, env).port == 9000
    assert load_settings({"poll_interval": "0.25"}, env).poll_interval == 0.25
    assert load_settings({}, {"PORT": "9000", "RELAY_PORT": "9100"}).port == 9100
    assert load_settings({}, {"RELAY_UPSTREAM_RATE": "20"}).upstream_rate == 20.0
    assert load_settings({}, {"RELAY_FETCH_RESULT": "0"}).fetch_result is False
    assert load_settings({"max_connections": "5"}, {}).max_connections == 5
    origins = load_settings({}, {"RELAY_ALLOWED_ORIGINS": "https://a.example, https://b.example/"})
    assert origins.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        ({"poll_interval": "abc"}, {}, "--poll-interval"),
        ({}, {"RELAY_POLL_INTERVAL": "-1"}, "RELAY_POLL_INTERVAL"),
        ({"port": "70000"}, {}, "--port"),
        ({"upstream_url": "ftp://x"}, {}, "--upstream"),
        ({"redis_url": "http://x"}, {}, "--redis"),
        ({}, {"RELAY_ACCESS_KEY_ID": "only-the-id"}, "RELAY_ACCESS_KEY_SECRET"),
        ({"fetch_result": "maybe"}, {}, "--fetch-result"),
        ({"signing": "hmac"}, {}, "--signing"),
        ({}, {"RELAY_LOG_LEVEL": "loud"}, "RELAY_LOG_LEVEL"),
    ],
)
def test_bad_values_name_the_setting(
    flags: dict[str, str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(flags, env)


def test_bad_flag_is_a_one_line_error_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--poll-interval", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "relay: error: --poll-interval must be a positive number, got 'soon'"
    ]


def test_secret_is_not_in_the_settings_repr() -> None:
    settings = load_settings({}, {"RELAY_ACCESS_KEY_ID": "id", "RELAY_ACCESS_KEY_SECRET": "s3cr3t"})
    assert "s3cr3t" not in repr(settings)


def test_serve_without_upstream_says_it_runs_on_the_simulator() -> None:
    relay = ProcessServer(["serve"]).start()
    try:
        assert httpx.post(f"{relay.url}/sim/tasks", json={}).status_code == 201
    finally:
        relay.stop()
    first = relay.log().splitlines()[0]
    assert "embedded simulator" in first


def relay_command(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS` run to its end, in an environment without relay settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**clean, **(env or {})},
    )


def test_a_real_upstream_without_the_access_key_pair_needs_signing_none() -> None:
    upstream = {"RELAY_UPSTREAM_URL": "https://upstream.example"}
    with pytest.raises(ConfigError) as raised:
        load_settings({}, upstream)
    message = str(raised.value)
    for named in ("RELAY_ACCESS_KEY_ID", "RELAY_ACCESS_KEY_SECRET", "--signing none"):
        assert named in message
    assert load_settings({"signing": "none"}, upstream).signing == "none"
    assert load_settings({}, {**upstream, "RELAY_SIGNING": "none"}).access_key_id is None
    pair = {"RELAY_ACCESS_KEY_ID": "id", "RELAY_ACCESS_KEY_SECRET": "secret"}
    assert load_settings({}, {**upstream, **pair}).access_key_id == "id"
    assert load_settings({}, {}).simulated  # the embedded simulator needs no pair

    result = relay_command("serve", "--upstream", "https://upstream.example", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"relay: error: {message}"]


def test_cluster_mode_on_embedded_simulators_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"redis_url": "redis://127.0.0.1:6379/0"}, {})
    assert str(raised.value).startswith(
        "--redis (RELAY_REDIS_URL) needs --upstream (RELAY_UPSTREAM_URL)"
    )
    assert "embedded simulator" in str(raised.value)
    result = relay_command("serve", "--redis", "redis://127.0.0.1:9/0", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"relay: error: {raised.value}"]


def test_a_cluster_node_logs_its_node_id_at_start(redis_url: str) -> None:
    simulator = ProcessServer(["simulate"]).start()
    args = ["serve", "--upstream", simulator.url, "--signing", "none", "--redis", redis_url]
    relay = ProcessServer(args).start()
    try:
        created = httpx.post(f"{simulator.url}/sim/tasks", json={})
        assert created.status_code == 201
    finally:
        relay.stop()
        simulator.stop()
    found = re.search(r"cluster mode, node ID ([0-9a-f]+)", relay.log())
    assert found is not None, relay.log()


def test_relay_simulate_says_where_it_listens() -> None:
    simulator = ProcessServer(["simulate"]).start()
    try:
        log = simulator.log()
    finally:
        simulator.stop()
    lines = [line for line in log.splitlines() if "listening on" in line]
    assert len(lines) == 1, log
    assert f"simulator listening on {simulator.url}/" in lines[0]
    assert f"--upstream {simulator.url} --signing none" in lines[0]
    # Still warnings only otherwise: no uvicorn start-up chatter.
    assert "Application startup complete" not in log


def test_a_webhook_secret_not_in_the_whsec_form_says_what_is_expected() -> None:
    for raw, got in (("nope", "got 3 bytes"), ("whsec_not base64!", "not base64")):
        with pytest.raises(ConfigError) as raised:
            load_settings({}, {"RELAY_WEBHOOK_SECRET": raw})
        message = str(raised.value)
        assert message.startswith("RELAY_WEBHOOK_SECRET must be whsec_ followed by the base64")
        assert got in message and "os.urandom" in message


def test_the_token_secret_length_rule_is_the_settings_own() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"RELAY_TOKEN_SECRET": "short"})
    assert str(raised.value) == "RELAY_TOKEN_SECRET must be at least 32 bytes long"
    # `relay token` reads the secret as `relay serve` does: the same rule, the same line.
    result = relay_command("token", "task-a", env={"RELAY_TOKEN_SECRET": " short "})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"relay: error: {raised.value}"]
    padded = relay_command("token", "task-a", env={"RELAY_TOKEN_SECRET": f" {'s' * 32} "})
    assert padded.returncode == 0 and padded.stdout.count(".") == 2


def test_simulate_reads_the_access_key_pair_as_serve_does() -> None:
    result = relay_command(
        "simulate", "--verify-signatures", "--port", "0", env={"RELAY_ACCESS_KEY_ID": "id"}
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay: error: --verify-signatures needs RELAY_ACCESS_KEY_ID and RELAY_ACCESS_KEY_SECRET"
    ]


def test_procfile_runs_the_relay_on_port_on_all_interfaces() -> None:
    procfile = (Path(ROOT) / "Procfile").read_text()
    assert procfile.strip() == "web: relay serve --host 0.0.0.0 --port $PORT"


def limits_table() -> str:
    """README's "Security and limits" section, or docs/operations.md's "Limits" once moved."""
    readme = (ROOT / "README.md").read_text()
    if "## Security and limits" in readme:
        return readme.split("## Security and limits")[1].split("\n## ")[0]
    return (ROOT / "docs" / "operations.md").read_text().split("## Limits")[1].split("\n## ")[0]


def test_the_limits_table_states_the_real_defaults() -> None:
    """Every row of the limits table names an option and its default."""
    rows = re.findall(r"^\| `(RELAY_[A-Z_]+)` \| ([^|]+) \|", limits_table(), flags=re.MULTILINE)
    assert len(rows) >= 10, rows
    by_env = {env: option for option in OPTIONS for env in option.env}
    for env, stated in rows:
        shown = by_env[env].shown_default
        if shown is None:
            assert not stated.strip().startswith("`"), (env, stated)
        else:
            assert stated.strip() == f"`{shown}`", env


def settings_row(option: Option) -> str:
    env = " or ".join(f"`{name}`" for name in option.env)
    flag = f"`{option.flag} {option.metavar}`" if option.flag else ""
    shown = option.shown_default
    default = option.unset_text if shown is None else f"`{shown}`"
    return f"| {env} | {flag} | {default} | {option.help} |"


def test_docs_settings_table_is_the_declarations() -> None:
    """docs/settings.md's table is rendered from relay/config.py, row for row: no drift."""
    expected = [
        "| environment variable | flag | default | meaning |",
        "|---|---|---|---|",
        *(settings_row(option) for option in OPTIONS),
    ]
    doc = (ROOT / "docs" / "settings.md").read_text()
    table = [line for line in doc.splitlines() if line.startswith("|")]
    assert table == expected, "docs/settings.md should have this table:\n" + "\n".join(expected)


def help_of(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """A command's help, its whitespace squeezed (argparse wraps to the terminal's width)."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_shows_each_option_once_with_env_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = help_of(["serve"], capsys, monkeypatch)
    assert text.startswith("usage: relay serve [OPTION ...]")
    assert "VALUE" not in text
    for expected in (
        "--poll-interval SECONDS seconds between polls of a running task"
        " (env RELAY_POLL_INTERVAL, default 1)",
        "--port PORT listening port (env RELAY_PORT or PORT, default 8000)",
        "--signing {apigw,none} ",
        "(env RELAY_SIGNING, default apigw)",
        "--log-level {debug,info,warning,error} ",
        "(env RELAY_LOG_LEVEL, default info)",
        "--log-format {text,json} ",
        "(env RELAY_LOG_FORMAT, default text)",
        "--upstream URL base URL of the progress API"
        " (env RELAY_UPSTREAM_URL, default unset: embedded simulator)",
        "--fetch-result {0,1} ",
        "RELAY_TOKEN_SECRET HS256 secret",
    ):
        assert expected in text, expected
    for option in OPTIONS:
        default = f"default {option.shown_default or option.unset_text}"
        if option.flag is None:
            assert f"{option.env[0]} {option.help} ({default})" in text, option.name
        else:
            env = " or ".join(option.env)
            line = f"{option.flag} {option.metavar} {option.help} (env {env}, {default})"
            assert line in text, line
            assert text.count(f"{option.flag} ") == 1, option.flag


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("simulate", ["--port PORT listening port (default 8001)", "--fail-rate SHARE "]),
        ("simulate", ["--log-level {debug,info,warning,error} ", "(default warning)"]),
        ("token", ["usage: relay token [-h] [--ttl SECONDS] TASK_ID [TASK_ID ...]"]),
        ("token", ["--ttl SECONDS seconds until it expires (default 600)", "RELAY_TOKEN_SECRET"]),
    ],
)
def test_simulate_and_token_help(
    command: str,
    expected: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = help_of([command], capsys, monkeypatch)
    assert "VALUE" not in text and "(env " not in text
    for part in expected:
        assert part in text, part
    for option in SIMULATE_OPTIONS if command == "simulate" else TOKEN_OPTIONS:
        line = f"{option.flag} {option.metavar} {option.help} (default {option.shown_default})"
        assert line in text, line


def test_watch_help_shows_each_option_with_env_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = help_of(["watch"], capsys, monkeypatch)
    assert text.startswith("usage: relay watch [-h] [--url URL] [--token TOKEN] [--json] TASK_ID")
    assert "VALUE" not in text and "Exit status 0 when the task succeeded, 1 when it failed" in text
    for option in WATCH_OPTIONS:
        env = " or ".join(option.env)
        default = f"default {option.shown_default or option.unset_text}"
        line = f"{option.flag} {option.metavar} {option.help} (env {env}, {default})"
        assert line in text, line
    assert "--url URL base URL of the relay (env RELAY_URL, default http://127.0.0.1:8000)" in text
    assert "(env RELAY_TOKEN, default unset: no token)" in text
    assert "--json print each state as one line of JSON" in text and "(default off)" in text


def test_top_level_help_lists_the_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = help_of([], capsys, monkeypatch)
    assert text.startswith("usage: relay [-h] [--version] COMMAND ...")
    for command in (
        "serve run the relay",
        "simulate run the simulated",
        "token print an",
        "watch follow a task",
    ):
        assert command in text
    assert "relay COMMAND --help" in text


def test_bare_relay_prints_the_full_help_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: relay [-h] [--version] COMMAND ...")
    assert "commands:" in result.stderr and "relay COMMAND --help" in result.stderr


@pytest.mark.parametrize("command", ["serve", "simulate", "token", "watch"])
def test_an_unknown_option_gets_the_command_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        takes_task = command in ("token", "watch")
        main([command, "task-a", "--bogus"] if takes_task else [command, "--bogus"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"usage: relay {command} ")
    assert lines[-1] == f"relay {command}: error: unrecognized arguments: --bogus"


def test_a_bad_simulate_flag_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--fail-rate", "2"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "relay: error: --fail-rate must be a number from 0 to 1, got '2'"
    ]


@pytest.mark.parametrize(
    ("command", "ways"), [("serve", "--port or RELAY_PORT/PORT"), ("simulate", "--port")]
)
def test_a_busy_port_is_one_line_and_exit_2(command: str, ways: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "relay", command, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"relay: error: 127.0.0.1:{port} is already in use: choose another port with {ways}"
    ]
    assert "Application startup complete" not in result.stderr
    assert "http://" not in result.stderr


def test_relay_simulate_misbehaves_as_its_fault_flags_say() -> None:
    flaky = ProcessServer(["simulate", "--error-rate", "1"]).start()
    throttled = ProcessServer(["simulate", "--throttle-rate", "1", "--retry-after", "7"]).start()
    broken = ProcessServer(["simulate", "--malformed-rate", "1"]).start()
    try:
        body = {"taskId": "any-task"}
        path = "/scc/comfy_get_progress"
        assert httpx.post(flaky.url + path, json=body).status_code == 500
        answer = httpx.post(throttled.url + path, json=body)
        assert answer.status_code == 429 and answer.headers["retry-after"] == "7"
        answer = httpx.post(broken.url + path, json=body)
        with pytest.raises(ValueError):
            answer.json()
    finally:
        for server in (flaky, throttled, broken):
            server.stop()
