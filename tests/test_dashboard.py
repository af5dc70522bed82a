"""The Grafana dashboard and the Prometheus alert rules against the metrics a live relay exposes.

docs/grafana/comfy-relay.json must chart every `relay_` metric family, and neither it nor
docs/prometheus/alerts.yml may name a metric the relay does not expose. The relays scraped
are a single one with watches and webhooks on, and a cluster node on a real Redis, so that
every family appears. `promtool` (Debian's `prometheus` package, installed by .ci/run) checks
the rules and runs their unit tests, docs/prometheus/alerts.test.yml.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import RelayFactory
from .servers import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "comfy-relay.json"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "docs" / "prometheus" / "alerts.test.yml"
METRIC_NAME = re.compile(r"\brelay_[a-z_]+\b")
DATASOURCE = "${DS_PROMETHEUS}"
SECRET = "whsec_" + base64.b64encode(b"dashboard-test-secret-32-bytes!!").decode()
SAMPLE_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def scrape(url: str) -> tuple[set[str], set[str]]:
    """The relay's metric families, and every sample name it exposes."""
    text = httpx.get(url + "/metrics", timeout=5).text
    # Leaves out the `_created` gauges prometheus_client adds beside each counter and histogram.
    families = [
        f
        for f in text_string_to_metric_families(text)
        if f.name.startswith("relay_") and not f.name.endswith("_created")
    ]
    names = {f.name for f in families}
    samples = {s.name for f in families for s in f.samples}
    # A counter or histogram family without children yet still has these names.
    for family in families:
        if family.type == "counter":
            samples.add(family.name + "_total")
        if family.type == "histogram":
            samples |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names, samples


@pytest.fixture
def exposed(make_relay: RelayFactory, redis_url: str, tmp_path: Path) -> tuple[set[str], set[str]]:
    single = make_relay(
        api_key="dashboard-key",
        webhook_url="http://127.0.0.1:9/hook",
        webhook_secret=SECRET,
        data_dir=str(tmp_path),
    )
    node = make_relay(redis_url=redis_url, api_key="dashboard-key")
    families, samples = scrape(single.url)
    more_families, more_samples = scrape(node.url)
    return families | more_families, samples | more_samples


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [dashboard["templating"]["list"][0]["definition"]]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def family_of(sample: str) -> str:
    for suffix in SAMPLE_SUFFIXES:
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def test_every_metric_family_is_on_the_dashboard(exposed: tuple[set[str], set[str]]) -> None:
    families, samples = exposed
    charted = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert families - {family_of(name) for name in charted} == set()
    assert charted - samples == set(), "the dashboard names metrics the relay does not expose"
    # The families a cluster node adds are there too (not only the single relay's).
    assert {"relay_redis_healthy", "relay_leases_held", "relay_watches"} <= families


def test_every_alert_names_only_metrics_the_relay_exposes(
    exposed: tuple[set[str], set[str]],
) -> None:
    _, samples = exposed
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "RelayUpstreamFailing",
        "RelayUpstreamBudgetExhausted",
        "RelayRedisDegraded",
        "RelayPollLoopCapNear",
        "RelayConnectionCapNear",
        "RelayWebhookDeliveriesFailing",
    }
    for rule in rules:
        named = set(METRIC_NAME.findall(rule["expr"]))
        assert named, rule["alert"]
        assert named <= samples, (rule["alert"], named - samples)
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_asks_for_its_prometheus_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [source] = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert '{instance=~"$instance"' in target["expr"], panel["title"]
    assert dashboard["templating"]["list"][0]["datasource"]["uid"] == DATASOURCE


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install -y prometheus (as .ci/run does)")
    return found


def test_promtool_loads_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    """promtool's unit tests of the rules (docs/prometheus/alerts.test.yml)."""
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ALERT_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {m for m in re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text())}
    assert tested == {r["alert"] for r in alert_rules()}, "an alert without a unit test"
