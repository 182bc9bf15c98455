"""The Helm chart, proven with the real helm: lint, schema-valid Kubernetes objects for both
datacenter examples, a values schema that refuses mistakes, a rendered topology the router
accepts, and the helm-unittest suites. Needs helm and helm-unittest (./dev setup builds them);
without them these tests fail."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import certifi
import kubernetes_validate
import pytest
import yaml

from devstack.tools import tool
from router.engine import write_deadline
from router.topology import load_topology
from tests.deploy.chart import CHART, EXAMPLES, KUBE_VERSION, by_kind, helm, render, template

CORE_KINDS = {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"}
SECRETS_DIR = "/etc/failover-router/secrets/"


def test_examples_are_the_two_datacenters() -> None:
    """Both documented examples exist: dc1 and dc2."""
    assert [p.name for p in EXAMPLES] == ["dc1.yaml", "dc2.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_helm_lint_passes(example: Path) -> None:
    """`helm lint --strict` with each datacenter's values: no error, no warning."""
    out = helm("lint", "--strict", str(CHART), "-f", str(example), "--kube-version", KUBE_VERSION)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_objects_are_valid_kubernetes_1_31(example: Path) -> None:
    """Every core object rendered for each datacenter validates against the Kubernetes 1.31
    JSON schemas in strict mode (unknown fields refused), offline."""
    docs = render([example])
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == CORE_KINDS
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {exc}") from None
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), keys


def test_validator_refuses_a_broken_object() -> None:
    """The schema check has teeth: a Deployment with a misspelt field is refused."""
    docs = render([EXAMPLES[0]])
    deployment = by_kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_monitoring_objects_carry_the_alerts_file_and_the_datacenter(example: Path) -> None:
    """The PrometheusRule is files/alerts.yaml (plus the example's alert labels) and the
    ServiceMonitor adds the datacenter label the dashboard and the alerts group by."""
    values = yaml.safe_load(example.read_text())
    docs = render([example])
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    extra = values.get("prometheusRule", {}).get("additionalAlertLabels", {})
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["labels"] = {**extra, **rule.get("labels", {})}  # the rule's own win
    (rule_obj,) = by_kind(docs, "PrometheusRule")
    assert rule_obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule_obj["spec"]["groups"] == rules["groups"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert {
        "action": "replace",
        "targetLabel": "datacenter",
        "replacement": values["datacenter"],
    } in endpoint["relabelings"]


def _rendered_topology(docs: list[dict[str, Any]]) -> str:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if "topology.yaml" in d["data"]]
    return str(cm["data"]["topology.yaml"])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_topology_is_accepted_by_the_router(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The topology.yaml in each example's ConfigMap loads in the router (secret files laid
    out under a temp dir in place of the pod's mounts, env secrets set), for its datacenter,
    and the pod's grace period is the router's own largest write deadline + the margin."""
    docs = render([example])
    text = _rendered_topology(docs)
    for rel in set(re.findall(re.escape(SECRETS_DIR) + r"(\S+)", text)):
        secret = tmp_path / "secrets" / rel
        secret.parent.mkdir(parents=True, exist_ok=True)
        if secret.suffix in (".crt", ".pem"):  # CA files are read at load: a real bundle
            secret.write_text(Path(certifi.where()).read_text())
        else:
            secret.write_text("not-a-real-secret\n")
    text = text.replace(SECRETS_DIR, f"{tmp_path}/secrets/")
    for env in set(re.findall(r"_env: (\w+)", text)):
        monkeypatch.setenv(env, "not-a-real-secret")
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    topology = load_topology(path)
    values = yaml.safe_load(example.read_text())
    assert topology.datacenter == values["datacenter"]
    assert topology.http.listen == "0.0.0.0:8080"
    assert set(topology.clusters) == set(values["topology"]["clusters"])
    (deployment,) = by_kind(docs, "Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    deadline = max(write_deadline(c) for c in topology.clusters.values())
    assert grace == int(deadline) + 30


def test_the_pod_template_carries_no_topology_checksum() -> None:
    """No annotation of the pod template depends on the topology: changing it (a drain)
    changes the ConfigMap only, so the running pods reload it instead of rolling."""
    base = render([EXAMPLES[0]])
    drained = render([EXAMPLES[0]], ["topology.clusters.influx-dc1-a.drain=true"])
    pod = by_kind(base, "Deployment")[0]["spec"]["template"]
    assert pod == by_kind(drained, "Deployment")[0]["spec"]["template"]
    assert _rendered_topology(base) != _rendered_topology(drained)
    assert "drain: true" in _rendered_topology(drained)


BAD_VALUES = {
    "misspelt top-level key": ("replicas: 3\n", "replicas"),
    "replicaCount as a string": ('replicaCount: "3"\n', "replicaCount"),
    "misspelt cluster key": (
        "topology:\n  clusters:\n    influx-dc1-a:\n      write_timout: 5s\n",
        "write_timout",
    ),
    "unknown route mode": (
        "topology:\n  routes:\n    - {name: r, topics: [t], mode: failovr}\n",
        "mode",
    ),
    "a duration that is not one": (
        "topology:\n  health: {interval: soon}\n",
        "interval",
    ),
    "an inline password": (
        "topology:\n  clusters:\n    influx-dc1-a: {urls: [http://x:8086], password: hunter2}\n",
        "password",
    ),
    "no datacenter": ('datacenter: ""\n', "datacenter"),
    "probe port as text in the service": ("service: {port: http}\n", "port"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_values_schema_refuses_mistakes(case: str, tmp_path: Path) -> None:
    """A values file with a mistyped key or a wrong type fails at render time (as it would at
    `helm install`), naming the key, instead of producing a broken release."""
    text, key = BAD_VALUES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = template([EXAMPLES[0], bad])
    assert out.returncode != 0, f"{case}: rendered anyway"
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert key in out.stderr, out.stderr
    assert "hunter2" not in out.stderr


def test_helm_unittest_suites_pass() -> None:
    """The chart's logic (helm/failover-router/tests/*_test.yaml): no topology checksum,
    Secrets as files, the grace period from the write deadline, monitoring objects only when
    enabled, probes, security context."""
    out = subprocess.run(
        [str(tool("helm-unittest")), "--color=false", str(CHART)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"Tests:\s+(\d+) passed", out.stdout)
    assert match and int(match[1]) >= 25, out.stdout
