"""Offline schema checks of the deployment files: the Compose spec and Kubernetes' OpenAPI
schemas (both shipped inside PyPI packages, so nothing is fetched)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
#: Kubernetes' own kinds (the PrometheusRule is a CRD: checked by its own test below).
K8S = sorted(p for p in (ROOT / "k8s").glob("*.yaml") if p.name != "prometheus-rules.yaml")


def compose_schema() -> dict:
    # check-jsonschema vendors the Compose spec; read the file without importing its CLI.
    root = Path(importlib.util.find_spec("check_jsonschema").submodule_search_locations[0])
    return json.loads(next(root.rglob("compose-spec.json")).read_text())


def test_docker_compose_matches_the_compose_spec():
    schema = compose_schema()
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(doc)
    assert {"kafka", "nats", "clickhouse", "bridge", "worker", "sink", "simulator"} <= set(doc["services"])
    assert doc["services"]["worker"]["healthcheck"]["test"]
    from app.local import kafka_version

    assert doc["services"]["kafka"]["image"] == f"apache/kafka:{kafka_version()}", "the version the tests run"


def test_the_compose_check_catches_a_broken_file():
    schema = compose_schema()
    broken = {"services": {"worker": {"image": 42, "restart": "sometimes-maybe"}}}
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_api_schemas(path: Path):
    from kubernetes_validate import utils

    for doc in yaml.safe_load_all(path.read_text()):
        utils.validate(doc, utils.latest_version(), strict=True)


def test_workers_are_a_stateful_set_with_probes_volume_and_hardening():
    docs = [d for p in K8S for d in yaml.safe_load_all(p.read_text())]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # separate probes: a recovering worker is alive (never killed for a long replay), not ready
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert any(d["kind"] == "PodDisruptionBudget" for d in docs)
    assert any(d["kind"] == "Service" and d["spec"].get("clusterIP") == "None" for d in docs)


def test_the_bridge_and_the_sink_have_probes_and_metrics_on_their_port():
    docs = {d["metadata"]["name"]: d for p in K8S for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "Deployment"}
    for name, port in (("execution-bridge", 8013), ("execution-sink", 8014)):
        pod = docs[name]["spec"]["template"]
        c = pod["spec"]["containers"][0]
        assert c["ports"] == [{"name": "http", "containerPort": port}]
        assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/livez")
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_a_broken_manifest_is_caught():
    from kubernetes_validate import utils

    with pytest.raises(Exception):
        utils.validate({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                        "spec": {"replicas": "two"}}, utils.latest_version(), strict=True)


# --------------------------------------------------------------------------- monitoring
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "by", "without",
                    "and", "or", "unless", "humanize", "absent", "vector"}


def promql_problems(expr: str) -> list[str]:
    """A small offline lint of a PromQL expression (no Prometheus here): balanced brackets,
    known functions, valid range durations, metric names of this service."""
    import re

    problems = []
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                problems.append(f"unbalanced {ch!r}")
    if stack:
        problems.append(f"unclosed {stack}")
    for fn in re.findall(r"\b([a-z_]+)\s*\(", expr):
        if fn not in PROMQL_FUNCTIONS:
            problems.append(f"unknown function {fn!r}")
    for rng in re.findall(r"\[([^\]]+)\]", expr):
        if not re.fullmatch(r"\d+[smhd]|\$__rate_interval", rng):
            problems.append(f"bad range [{rng}]")
    return problems


def test_the_alert_rules_are_a_valid_prometheus_rule():
    import jsonschema

    doc = yaml.safe_load((ROOT / "k8s" / "prometheus-rules.yaml").read_text())
    rule = {"type": "object", "required": ["alert", "expr", "labels", "annotations"], "additionalProperties": False,
            "properties": {"alert": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"}, "expr": {"type": "string"},
                           "for": {"type": "string", "pattern": r"^\d+[smh]$"},
                           "labels": {"type": "object", "required": ["severity"],
                                      "properties": {"severity": {"enum": ["warning", "critical"]}}},
                           "annotations": {"type": "object", "required": ["summary", "description"]}}}
    schema = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
              "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
                             "spec": {"type": "object", "required": ["groups"], "properties": {"groups": {
                                 "type": "array", "minItems": 1, "items": {
                                     "type": "object", "required": ["name", "rules"],
                                     "properties": {"rules": {"type": "array", "minItems": 1, "items": rule}}}}}}}}
    jsonschema.validate(doc, schema)
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        assert promql_problems(r["expr"]) == [], (r["alert"], promql_problems(r["expr"]))
    # what ops asked to be alerted on
    alerts = {r["alert"] for r in rules}
    assert {"ExecutionSlippageAboveThreshold", "ExecutionPositionDiscrepancy", "ExecutionDeadLetters",
            "ExecutionConsumerLag", "ExecutionStuckOrders", "ExecutionWorkerNotReady"} <= alerts


def test_the_grafana_dashboard_is_valid_and_its_queries_lint():
    dash = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in dash["panels"]:
        assert p["type"] in {"timeseries", "stat"} and p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        for t in p["targets"]:
            assert promql_problems(t["expr"]) == [], (p["title"], t["expr"])


def test_the_monitoring_uses_only_metrics_the_service_exports():
    """Names checked here against what the code declares; tests/test_operate.py and
    tests/test_analysts.py check them against live /metrics of a worker, the bridge and the sink."""
    from app.runtime import COUNTERS
    from support import monitoring_metric_names

    worker = {f"execution_{n}_total" for n in COUNTERS} | {
        "execution_slippage_pips", "execution_consumer_lag", "execution_open_orders", "execution_ready",
        "execution_config_revision", "execution_config_rejected"}
    from prometheus_client import CollectorRegistry

    from app.web import FaustSensor

    registry = CollectorRegistry()
    FaustSensor.create(registry, "execution_faust")  # the worker's Faust sensor
    worker |= {m.name for m in registry.collect()}
    bridge_sink = {"execution_bridge_forwarded_total", "execution_bridge_dead_letters_total",
                   "execution_bridge_notify_retries_total", "execution_sink_rows_total", "execution_sink_dead_lettered_total", "execution_sink_pending_records"}
    assert monitoring_metric_names() <= worker | bridge_sink, monitoring_metric_names() - worker - bridge_sink


@pytest.fixture(scope="module")
def promtool() -> str:
    """Prometheus's promtool: the one on PATH (Debian's package ``prometheus``, which .ci/run
    installs), else built with Go into the cache on first use (tests/promtool/fetch)."""
    import shutil
    import subprocess

    if found := shutil.which("promtool"):
        return found
    out = subprocess.run([str(ROOT / "tests" / "promtool" / "fetch")], capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def run_promtool(promtool: str, workdir: Path, *args: str) -> tuple[int, str]:
    import subprocess

    r = subprocess.run([promtool, *args], cwd=workdir, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def rules_workdir(tmp_path: Path, spec: dict) -> Path:
    import shutil

    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ROOT / "tests" / "promtool" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    return tmp_path


@pytest.mark.slow
def test_promtool_checks_the_rules_and_their_alerts_fire(promtool: str, tmp_path: Path):
    """Prometheus's own parser on the alert rules and the dashboard's queries, and the alerts
    of tests/promtool/rules_test.yaml evaluated on synthetic series (partial scrapes too)."""
    spec = yaml.safe_load((ROOT / "k8s" / "prometheus-rules.yaml").read_text())["spec"]
    work = rules_workdir(tmp_path, spec)
    rc, out = run_promtool(promtool, work, "check", "rules", "rules.yaml")
    assert rc == 0, out
    rc, out = run_promtool(promtool, work, "test", "rules", "rules_test.yaml")
    assert rc == 0, out
    # every alert has a case
    cases = yaml.safe_load((work / "rules_test.yaml").read_text())["tests"]
    tested = {t["alertname"] for c in cases for t in c.get("alert_rule_test", [])}
    assert tested == {r["alert"] for g in spec["groups"] for r in g["rules"]}

    # the dashboard's queries parse in Prometheus (as recording rules: promtool has no query lint)
    dash = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"].replace("$__rate_interval", "5m") for p in dash["panels"] for t in p["targets"]]
    records = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (work / "dashboard.yaml").write_text(yaml.safe_dump(records))
    rc, out = run_promtool(promtool, work, "check", "rules", "dashboard.yaml")
    assert rc == 0, out


@pytest.mark.slow
def test_promtool_catches_an_alert_that_does_not_fire(promtool: str, tmp_path: Path):
    spec = yaml.safe_load((ROOT / "k8s" / "prometheus-rules.yaml").read_text())["spec"]
    for g in spec["groups"]:
        for r in g["rules"]:
            if r["alert"] == "ExecutionSlippageAboveThreshold":
                r["expr"] = r["expr"].replace("> 0", "> 100")
    rc, out = run_promtool(promtool, rules_workdir(tmp_path, spec), "test", "rules", "rules_test.yaml")
    assert rc != 0 and "ExecutionSlippageAboveThreshold" in out, out
