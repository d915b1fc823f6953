"""Cluster tier: the rendered charts and every shipped manifest pass `kubectl apply --dry-run=server
--validate=strict` against the real kube-apiserver of hack/test-cluster.sh, with the real KServe,
OpenShift and prometheus-operator CRDs installed (empty defaults stripped for Kubernetes 1.20).

Dry-run runs admission and the API server's own validation (and, for custom resources, the CRD's
structural schema), which the offline validator only approximates."""

from __future__ import annotations

import copy
import subprocess
import uuid
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.charts.conftest import OPERATOR, SERVING, set_args
from tests.charts.test_operator_chart import CLUSTER_SCOPED
from tests.charts.test_operator_chart import VALUE_SETS as OPERATOR_VALUES
from tests.charts.test_serving_chart import VALUE_SETS as SERVING_VALUES
from tests.cluster import ROOT, install_crds, kubectl, require_cluster, require_tool

pytestmark = pytest.mark.cluster

CRD_FILES = sorted((ROOT / "tests" / "crds").glob("*.yaml")) + sorted((ROOT / "manifests" / "crd").glob("*.yaml"))


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """kubeconfig of the test cluster with the CRDs installed, and a fresh namespace for this module."""
    kubeconfig = require_cluster()
    install_crds(kubeconfig, CRD_FILES)
    namespace = f"charts-{uuid.uuid4().hex[:8]}"
    ensure_namespaces(kubeconfig, {namespace})
    yield {"kubeconfig": kubeconfig, "namespace": namespace}
    kubectl("delete", "namespace", namespace, "--wait=false", kubeconfig=kubeconfig, check=False)


def ensure_namespaces(kubeconfig: str, names: set[str]) -> None:
    for name in sorted(names):
        proc = kubectl("create", "namespace", name, kubeconfig=kubeconfig, check=False)
        assert proc.returncode == 0 or "AlreadyExists" in proc.stderr, proc.stderr


@lru_cache(maxsize=None)
def cluster_scoped_kinds(kubeconfig: str) -> frozenset[str]:
    out = kubectl("api-resources", "--namespaced=false", "--no-headers", kubeconfig=kubeconfig).stdout
    return frozenset(line.split()[-1] for line in out.splitlines() if line.strip())


def dry_run(kubeconfig: str, namespace: str, docs: list[dict]) -> subprocess.CompletedProcess:
    """Server-side dry-run apply; namespaced objects without a namespace go to `namespace`."""
    docs = copy.deepcopy(docs)
    for doc in docs:
        if doc["kind"] not in cluster_scoped_kinds(kubeconfig):
            doc["metadata"].setdefault("namespace", namespace)
    ensure_namespaces(kubeconfig, {d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")})
    return kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                   kubeconfig=kubeconfig, input=yaml.safe_dump_all(docs), check=False)


def helm_template(chart: Path, values: dict, namespace: str) -> list[dict]:
    out = subprocess.run([require_tool("helm"), "template", "demo", str(chart), "--namespace", namespace,
                          "--include-crds", *set_args(values)], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("name", SERVING_VALUES)
def test_serving_chart_dry_runs(cluster, name: str) -> None:
    docs = helm_template(SERVING, SERVING_VALUES[name], cluster["namespace"])
    proc = dry_run(cluster["kubeconfig"], cluster["namespace"], docs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


@pytest.mark.parametrize("name", OPERATOR_VALUES)
def test_operator_chart_dry_runs(cluster, name: str) -> None:
    values = dict(OPERATOR_VALUES[name])
    if "watch.namespaces" in values:  # watch namespaces that exist in this cluster
        values["watch.namespaces"] = [f"{cluster['namespace']}-{n}" for n in values["watch.namespaces"]]
    docs = helm_template(OPERATOR, values, cluster["namespace"])
    proc = dry_run(cluster["kubeconfig"], cluster["namespace"], docs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


def manifest_files() -> list[Path]:
    return sorted(p for p in (ROOT / "manifests").rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT / "manifests")))
def test_manifest_dry_runs(cluster, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    proc = dry_run(cluster["kubeconfig"], cluster["namespace"], docs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


def test_rhoai_template_objects_dry_run(cluster) -> None:
    """What `oc process` would create from the Template (the Template's objects are RawExtensions)."""
    template = yaml.safe_load((ROOT / "manifests" / "rhoai" / "servingruntime-template.yaml").read_text())
    proc = dry_run(cluster["kubeconfig"], cluster["namespace"], template["objects"])
    assert proc.returncode == 0, proc.stderr


def test_strict_dry_run_rejects_a_misspelled_field(cluster) -> None:
    """The check above has teeth: the same server refuses a field the schema does not know."""
    docs = helm_template(SERVING, {}, cluster["namespace"])
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    runtime["spec"]["containers"][0]["readinesProbe"] = runtime["spec"]["containers"][0].pop("readinessProbe")
    proc = dry_run(cluster["kubeconfig"], cluster["namespace"], [runtime])
    assert proc.returncode != 0 and "readinesProbe" in proc.stderr, proc.stdout + proc.stderr


def test_cluster_scoped_rules_are_exactly_the_cluster_scoped_resources(cluster) -> None:
    """The operator chart's namespaced mode puts these in a ClusterRole: ask the API server which are."""
    out = kubectl("api-resources", "--namespaced=false", "-o", "name", kubeconfig=cluster["kubeconfig"]).stdout
    cluster_scoped = {line.split(".")[0] for line in out.split()}
    rules = yaml.safe_load((OPERATOR / "files" / "rbac-rules.yaml").read_text())
    resources = {r.split("/")[0] for rule in rules for r in rule["resources"]}
    assert resources & cluster_scoped == CLUSTER_SCOPED
