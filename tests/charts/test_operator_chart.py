"""charts/dllm-operator with the real Helm binary: lint, strict validation, no drift from the operator's
own CRD and RBAC rule list (manifests/), least privilege in both watch scopes, and schema rejections."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.charts.conftest import OPERATOR, by_kind, one, set_args
from tests.cluster import ROOT
from tests.schema_validation import errors

CRD_SOURCE = ROOT / "manifests" / "crd"
RBAC_SOURCE = ROOT / "manifests" / "operator" / "rbac.yaml"
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterservingruntimes"}

VALUE_SETS: dict[str, dict[str, object]] = {
    "defaults": {},
    "namespaced-two-teams": {
        "watch.scope": "namespaced",
        "watch.namespaces": ["team-a", "team-b"],
        "kserveNamespace": "redhat-ods-applications",
        "settings": {"RESYNC_SECONDS": "15", "STARTUP_BUDGET_SECONDS": 3600},
        "logLevel": "debug",
    },
    "namespaced-own-namespace-metrics": {
        "watch.scope": "namespaced",
        "metrics.port": 9090,
        "serviceMonitor.enabled": True,
        "serviceMonitor.labels": {"release": "prometheus"},
        "image.tag": "0.1.0-rc1",
        "imagePullSecrets": ["quay-pull"],
    },
}

BAD_VALUES: dict[str, tuple[dict[str, object], str]] = {
    "unknown-scope": ({"watch.scope": "all"}, "/watch/scope"),
    "lowercase-setting": ({"settings": {"resync_seconds": "5"}}, "resync_seconds"),
    "health-port-zero": ({"healthPort": 0}, "/healthPort"),
    "invalid-namespace": ({"watch.namespaces": ["Team_A"]}, "/watch/namespaces"),
    "misspelled-key": ({"serviceAcount": {"create": True}}, "serviceAcount"),
    "servicemonitor-without-metrics-port": ({"serviceMonitor.enabled": True}, "metrics.port"),
}


def rule_key(rule: dict) -> tuple:
    return (tuple(rule.get("apiGroups", [])), tuple(rule.get("resources", [])), tuple(rule.get("verbs", [])),
            tuple(rule.get("resourceNames", [])))


def source_rules() -> list[tuple]:
    role = next(d for d in yaml.safe_load_all(RBAC_SOURCE.read_text()) if d and d["kind"] == "ClusterRole")
    return sorted(rule_key(r) for r in role["rules"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(OPERATOR), *set_args(VALUE_SETS[name])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates_strictly(render, name: str) -> None:
    for obj in render(OPERATOR, VALUE_SETS[name], namespace="dllm-operator"):
        assert errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_chart_crd_is_the_operator_crd() -> None:
    chart_crds = sorted(p.name for p in (OPERATOR / "crds").glob("*.yaml"))
    assert chart_crds == sorted(p.name for p in CRD_SOURCE.glob("*.yaml"))
    for name in chart_crds:
        assert (OPERATOR / "crds" / name).read_bytes() == (CRD_SOURCE / name).read_bytes(), (
            f"charts/dllm-operator/crds/{name} drifted from manifests/crd/{name}: copy it over")


def test_cluster_scope_renders_exactly_the_operator_rule_list(render) -> None:
    objs = render(OPERATOR, namespace="dllm-operator")
    role = one(objs, "ClusterRole")
    assert sorted(rule_key(r) for r in role["rules"]) == source_rules()
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "dllm-operator"}]
    assert not by_kind(objs, "Role")


def test_namespaced_scope_splits_the_same_rules_by_scope(render) -> None:
    objs = render(OPERATOR, VALUE_SETS["namespaced-two-teams"], namespace="dllm-operator")
    cluster = one(objs, "ClusterRole")
    assert {r for rule in cluster["rules"] for r in rule["resources"]} <= CLUSTER_SCOPED
    roles = by_kind(objs, "Role")
    team_roles = {r["metadata"]["namespace"]: r for r in roles if r["metadata"]["namespace"].startswith("team-")}
    assert set(team_roles) == {"team-a", "team-b"}
    kserve = [r for r in roles if r["metadata"]["namespace"] == "redhat-ods-applications"]
    assert len(kserve) == 1 and kserve[0]["rules"][0]["resourceNames"] == ["inferenceservice-config"]
    for role in team_roles.values():
        assert not CLUSTER_SCOPED & {r for rule in role["rules"] for r in rule["resources"]}
        union = sorted(rule_key(r) for r in cluster["rules"] + kserve[0]["rules"] + role["rules"])
        assert union == source_rules(), "namespaced mode must grant the same rules, only narrower in scope"
    bindings = by_kind(objs, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b", "redhat-ods-applications"}
    for b in bindings:
        assert b["subjects"][0]["namespace"] == "dllm-operator"


def test_deployment_is_one_recreated_restricted_replica_with_liveness(render) -> None:
    dep = one(render(OPERATOR, namespace="dllm-operator"), "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert "--all-namespaces" in c["args"] and "--standalone" in c["args"]
    liveness = next(a for a in c["args"] if a.startswith("--liveness="))
    port = next(p for p in c["ports"] if p["name"] == c["livenessProbe"]["httpGet"]["port"])
    assert liveness == f"--liveness=http://0.0.0.0:{port['containerPort']}/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "runAsUser" not in c["securityContext"] and "runAsUser" not in pod["securityContext"]
    assert pod["serviceAccountName"] == one(render(OPERATOR, namespace="dllm-operator"),
                                            "ServiceAccount")["metadata"]["name"]


def test_namespaced_deployment_watches_only_its_namespaces(render) -> None:
    objs = render(OPERATOR, VALUE_SETS["namespaced-two-teams"], namespace="dllm-operator")
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" not in c["args"]
    assert [a for a in c["args"] if a.startswith("--namespace=")] == ["--namespace=team-a", "--namespace=team-b"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["DLLM_OPERATOR_KSERVE_NAMESPACE"] == "redhat-ods-applications"
    assert env["DLLM_OPERATOR_RESYNC_SECONDS"] == "15"
    assert env["DLLM_OPERATOR_STARTUP_BUDGET_SECONDS"] == "3600"
    own = render(OPERATOR, VALUE_SETS["namespaced-own-namespace-metrics"], namespace="dllm-operator")
    c = one(own, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in c["args"] if a.startswith("--namespace=")] == ["--namespace=dllm-operator"]


def test_operator_settings_are_ones_the_operator_reads(render) -> None:
    try:
        from dllm_operator.config import OperatorSettings
    except ImportError:
        pytest.skip("dllm_operator.config not importable yet")
    objs = render(OPERATOR, VALUE_SETS["namespaced-two-teams"], namespace="dllm-operator")
    env = {e["name"]: e["value"] for e in one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = OperatorSettings.from_env(env)  # raises on a malformed value
    assert settings.kserve_namespace == "redhat-ods-applications"
    assert settings.resync_seconds == 15
    assert settings.startup_budget_seconds == 3600


def test_service_monitor_scrapes_the_metrics_port(render) -> None:
    objs = render(OPERATOR, VALUE_SETS["namespaced-own-namespace-metrics"], namespace="dllm-operator")
    svc, sm = one(objs, "Service"), one(objs, "ServiceMonitor")
    dep = one(objs, "Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert not by_kind(render(OPERATOR, namespace="dllm-operator"), "ServiceMonitor")


@pytest.mark.parametrize("name", BAD_VALUES)
def test_schema_rejects_bad_values(helm: str, name: str) -> None:
    values, fragment = BAD_VALUES[name]
    proc = subprocess.run([helm, "template", "op", str(OPERATOR), *set_args(values)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"{name} was accepted"
    assert fragment in proc.stderr, proc.stderr


def test_chart_versions_agree() -> None:
    serving = yaml.safe_load(Path(ROOT / "charts" / "dllm-serving" / "Chart.yaml").read_text())
    operator = yaml.safe_load((OPERATOR / "Chart.yaml").read_text())
    assert serving["appVersion"] == operator["appVersion"]
