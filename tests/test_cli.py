"""The `relay` command: flags over environment over defaults, one-line errors, first log line."""

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import httpx
import pytest

from relay.config import OPTIONS, ConfigError, Settings, load_settings

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


def test_procfile_runs_the_relay_on_port_on_all_interfaces() -> None:
    procfile = (Path(ROOT) / "Procfile").read_text()
    assert procfile.strip() == "web: relay serve --host 0.0.0.0 --port $PORT"


def test_the_readme_limits_table_states_the_real_defaults() -> None:
    """Every row of README's "Security and limits" table names an option and its default."""
    section = (ROOT / "README.md").read_text().split("## Security and limits")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(RELAY_[A-Z_]+)` \| ([^|]+) \|", section, flags=re.MULTILINE)
    assert len(rows) >= 10, rows
    by_env = {env: option for option in OPTIONS for env in option.env}
    defaults = Settings()
    for env, stated in rows:
        value = getattr(defaults, by_env[env].name)
        if value is None or value == ():
            assert not stated.strip().startswith("`"), (env, stated)
        else:
            expected = f"`{value:g}`" if isinstance(value, float) else f"`{value}`"
            assert stated.strip() == expected, env


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
