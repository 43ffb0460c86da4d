"""The operations center's Prometheus config and alert rules (config/ops-center/prometheus.yml,
alerts.yml), checked by Debian's promtool: `check config`, `check rules`, and `test rules`
with tests/ops-center/alerts_test.yml (each alert fires when it should, not before its
`for:`, not for a healthy box, and clears). The rest are cross-checks by text, so that a
new alert cannot ship untested, without a severity, without naming its box, or missing
from the runbook table in docs/operations.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.health import metrics
from tests.peers import REPO
from tests.test_fleet import NOW, healthy, scrape

CENTER = REPO / "config" / "ops-center"
RULES = CENTER / "alerts.yml"
UNIT = REPO / "tests" / "ops-center" / "alerts_test.yml"
DOCS = REPO / "docs" / "operations.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: make peers installs Debian's prometheus"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def alert_blocks() -> dict[str, str]:
    """Each alert's name -> its text in alerts.yml, up to the next alert or group."""
    parts = re.split(r"^\s*- (?:alert|name): ", RULES.read_text(), flags=re.M)[1:]
    blocks = {}
    for p in parts:
        name, _, body = p.partition("\n")
        if "expr:" in body:
            blocks[name.strip()] = body
    return blocks


@pytest.mark.peers
def test_promtool_checks_the_rules() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_blocks())} rules found" in r.stdout


@pytest.mark.peers
def test_promtool_checks_the_config_with_its_rules() -> None:
    r = promtool("check", "config", str(CENTER / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout


@pytest.mark.peers
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    r = promtool("test", "rules", str(UNIT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.peers
def test_the_unit_tests_fail_when_a_rule_is_broken(tmp_path: Path) -> None:
    """The unit tests can fail: BoxOffline without its `for:` fires too early for them."""
    (tmp_path / "config" / "ops-center").mkdir(parents=True)
    (tmp_path / "tests" / "ops-center").mkdir(parents=True)
    broken = RULES.read_text().replace("expr: fleet_box_online == 0\n        for: 30s",
                                       "expr: fleet_box_online == 0\n        for: 0s")
    assert broken != RULES.read_text()
    (tmp_path / "config" / "ops-center" / "alerts.yml").write_text(broken)
    unit = tmp_path / "tests" / "ops-center" / "alerts_test.yml"
    unit.write_text(UNIT.read_text())
    r = promtool("test", "rules", str(unit))
    assert r.returncode != 0 and "alertname: BoxOffline" in r.stdout + r.stderr, r.stdout + r.stderr


def series_in_rules() -> set[str]:
    return set(re.findall(r"\b((?:fleet|appliance)_[a-z_]+)\b", RULES.read_text()))


def exported(text: str) -> set[str]:
    return {s.name for m in text_string_to_metric_families(text) for s in m.samples}


def test_the_rules_read_only_series_fleet_serve_exports() -> None:
    f = healthy(queue={"items": {}, "oldest_unsent_ts": NOW - 60})
    used = {n for n in series_in_rules() if n.startswith("fleet_")}
    assert used and used <= exported(scrape(f)[1]), used - exported(scrape(f)[1])


def test_the_rules_read_only_series_the_box_exports() -> None:
    certs = metrics.Certificates({"mqtt": Path("/nonexistent")}, lambda paths: {})
    snapshot = {"audit": {"written": 0, "failed": 0,  # a box with an audit repository
                          "repository": {"sent": 0, "waiting": 0, "connected": True}}}
    collector = metrics.DaemonCollector(lambda: snapshot, lambda: {}, metrics.Tally(["pacs"]), certs,
                                        ["receive"], ["pacs"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    got = exported(generate_latest(registry).decode())
    used = {n for n in series_in_rules() if n.startswith("appliance_")}
    assert used and used <= got, used - got


def test_every_alert_is_unit_tested() -> None:
    tested = set(re.findall(r"alertname: (\w+)", UNIT.read_text()))
    assert set(alert_blocks()) <= tested, set(alert_blocks()) - tested


@pytest.mark.parametrize("name", sorted(alert_blocks()))
def test_each_alert_has_a_severity_a_runbook_and_names_its_box(name: str) -> None:
    body = alert_blocks()[name]
    assert re.search(r"severity: (critical|warning)\n", body), name
    assert 'runbook: "docs/operations.md#alerts"' in body, name
    summary = re.search(r'summary: "(.*)"', body)
    assert summary, name
    if name != "FleetViewDown":  # the one alert about the center, not a box
        assert "{{ $labels.box }}" in summary.group(1), name
    assert re.search(r"for: \d+[smh]\n", body), name


def test_every_alert_has_a_runbook_line_in_the_docs() -> None:
    text = DOCS.read_text()
    section = text[text.index("## Alerts"):]
    for name in alert_blocks():
        assert f"| `{name}` |" in section, name
