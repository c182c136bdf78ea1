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
K8S = sorted((ROOT / "k8s").glob("*.yaml"))


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
