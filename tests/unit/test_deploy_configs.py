"""The shipped Prometheus and Grafana configs: valid, and using only metrics we define.

promtool comes from Debian's ``prometheus`` package (``apt-get install -y prometheus``). Without
it these checks skip locally with a loud reason; with ``CI=true`` a missing promtool fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import missing_service
from tokyo_ia.observability.metrics import METRIC_NAMES, Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "vector",
    "absent", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "topk", "bottomk", "clamp_min", "clamp_max", "label_values", "scalar",
}  # fmt: skip
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_CONTEXT_LABELS = {"job", "instance", "le", "pod", "env"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found: apt-get install -y prometheus (Debian) to check deploy/prometheus"
        missing_service(message)
    return found


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    assert "SUCCESS: 7 rules found" in run_promtool("check", "rules", str(ALERTS))


def test_promtool_accepts_the_scrape_config() -> None:
    out = run_promtool("check", "config", str(PROMETHEUS))
    assert "is valid prometheus config file syntax" in out


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (strings, matchers, ranges and groupings removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:[smhdwy]|ms)?\b", " ", e)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e)) - _PROMQL_WORDS


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    names: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    return names


def defined_labels() -> set[str]:
    """Every label name metrics.py puts on a series, found by recording one of each event."""
    m = Metrics(models=["m"], providers=["p"], deployments=["p/m"], multiprocess_dir="")
    m.observe_request("/v1/chat/completions", "m", "p", 200, 0.1, 1, 1, 0.1, 0.1)
    m.observe_upstream("p", "m", 0.1)
    m.observe_cache("hit")
    m.observe_retry("p")
    m.observe_failover("m")
    m.observe_rate_limited("key")
    m.set_circuit_state("p/m", 0)
    m.set_pool_connections("p", 1, 1, 1)
    return {label for family in m.registry.collect() for s in family.samples for label in s.labels}


def check_expr(expr: str, where: str, allowed_extra: frozenset[str] = frozenset()) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names - allowed_extra:
        base = name
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
                base = name.removesuffix(suffix)
        assert base.startswith("tokyo_ia_") and base in METRIC_NAMES, f"{where}: unknown metric {name}"
    unknown = label_names(expr) - defined_labels() - _CONTEXT_LABELS
    assert not unknown, f"{where}: labels {unknown} are not on any tokyo_ia_ metric"


def test_alert_rules_use_only_our_metrics_and_are_documented() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "TokyoIAHighErrorRatio", "TokyoIAProviderCircuitOpen", "TokyoIALatencyBudgetBurnFast",
        "TokyoIALatencyBudgetBurnSlow", "TokyoIACostSpike", "TokyoIANoTraffic",
    } <= names  # fmt: skip
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    for rule in rules:
        check_expr(rule["expr"], rule["alert"], allowed_extra=frozenset({"up"}))
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket", "warning"}
        assert rule["alert"] in docs, f"{rule['alert']} is not explained in docs/monitoring.md"


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_provisioning_ready_and_uses_only_our_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns ids
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        where = f"{path.name}: panel {panel['title']!r}"
        assert panel["datasource"]["type"] == "prometheus", where
        assert panel["targets"], where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        for target in panel["targets"]:
            assert target["datasource"]["type"] == "prometheus", where
            check_expr(target["expr"], where)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match is not None, variable["definition"]
            check_expr(f'{match[1]}{{{match[2]}!=""}}', f"{path.name}: variable {variable['name']}")
    used = {name for p in graphs for t in p["targets"] for name in metric_names(t["expr"])}
    assert {"tokyo_ia_requests_total", "tokyo_ia_cost_usd_total", "tokyo_ia_circuit_state"} <= used
    assert "tokyo_ia_request_duration_seconds_bucket" in used


def test_grafana_provisioning_files() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert datasources["apiVersion"] == 1 and source["type"] == "prometheus" and source["uid"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tokyo-ia.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_the_expression_parser_itself() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{route=~"/v1/.*", le="10.0"}[$__rate_interval] offset 1d))) or vector(0)'
    assert metric_names(expr) == {"x_bucket"}
    assert label_names(expr) == {"route", "le", "model"}
