"""Cluster tier: real `helm install` / `upgrade` / `uninstall` of both charts into the real API server.

Checks what only a live release shows: the operator chart installs its CRD from crds/ and the
operator's ServiceAccount really holds the permissions of the one rule list; an upgrade that changes the
model replaces the download Job instead of failing on Job immutability; uninstall keeps the model
cache. No kubelet runs here, so pods stay Pending: only API objects are checked."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import yaml

from tests.charts.conftest import OPERATOR, SERVING, set_args
from tests.cluster import ROOT, install_crds, kubectl, require_cluster, require_tool

pytestmark = pytest.mark.cluster

THIRD_PARTY_CRDS = sorted((ROOT / "tests" / "crds").glob("*.yaml"))


@pytest.fixture(scope="module")
def kubeconfig() -> str:
    config = require_cluster()
    install_crds(config, THIRD_PARTY_CRDS)
    return config


@pytest.fixture
def namespace(kubeconfig: str):
    name = f"helm-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name, kubeconfig=kubeconfig)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", kubeconfig=kubeconfig, check=False)


def helm(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([require_tool("helm"), "--kubeconfig", kubeconfig, *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stderr}"
    return proc


def get(kubeconfig: str, kind: str, namespace: str, *names: str, selector: str | None = None) -> list[dict]:
    args = ["get", kind, "-n", namespace, "-o", "json", *names]
    if selector:
        args += ["-l", selector]
    out = json.loads(kubectl(*args, kubeconfig=kubeconfig).stdout)
    return out["items"] if "items" in out else [out]


def test_serving_release_lifecycle(kubeconfig: str, namespace: str) -> None:
    release = "llada"
    helm(kubeconfig, "install", release, str(SERVING), "-n", namespace,
         *set_args({"model.name": "llada-8b", "monitoring.enabled": True}))
    isvc = get(kubeconfig, "inferenceservices.serving.kserve.io", namespace, "llada-8b")[0]
    runtime = get(kubeconfig, "servingruntimes.serving.kserve.io", namespace,
                  isvc["spec"]["predictor"]["model"]["runtime"])[0]
    # What the API server stored (after pruning) still carries the KServe placeholder and our probes.
    container = runtime["spec"]["containers"][0]
    assert "--served-model-name={{.Name}}" in container["args"]
    assert container["startupProbe"]["failureThreshold"] == 180
    jobs = get(kubeconfig, "jobs", namespace, selector="app.kubernetes.io/component=model-download")
    assert len(jobs) == 1
    first_job = jobs[0]["metadata"]["name"]

    # Same model again: the Job is untouched. Another revision: a new Job replaces the old one.
    helm(kubeconfig, "upgrade", release, str(SERVING), "-n", namespace, "--reuse-values")
    assert [j["metadata"]["name"] for j in get(kubeconfig, "jobs", namespace,
                                               selector="app.kubernetes.io/component=model-download")] == [first_job]
    helm(kubeconfig, "upgrade", release, str(SERVING), "-n", namespace, "--reuse-values",
         *set_args({"model.revision": "refs-pr-7"}))
    names = [j["metadata"]["name"] for j in get(kubeconfig, "jobs", namespace,
                                                selector="app.kubernetes.io/component=model-download")
             if not j["metadata"].get("deletionTimestamp")]
    assert len(names) == 1 and names[0] != first_job
    env = {e["name"]: e.get("value") for e in get(kubeconfig, "jobs", namespace, names[0])[0]
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REVISION"] == "refs-pr-7"

    helm(kubeconfig, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    assert not get(kubeconfig, "inferenceservices.serving.kserve.io", namespace, selector="app.kubernetes.io/instance=llada")
    pvcs = get(kubeconfig, "pvc", namespace)
    assert [p["metadata"]["name"] for p in pvcs] == ["llada-dllm-serving-model-cache"], "the cache outlives the release"


def test_operator_release_installs_crd_and_grants_exactly_its_rules(kubeconfig: str, namespace: str) -> None:
    release = f"op-{namespace[-8:]}"
    helm(kubeconfig, "install", release, str(OPERATOR), "-n", namespace)
    crd = json.loads(kubectl("get", "crd", "diffusionlms.serving.dllm.io", "-o", "json",
                             kubeconfig=kubeconfig).stdout)
    assert crd["spec"]["names"]["shortNames"] == ["dlm"]
    sa = f"system:serviceaccount:{namespace}:{release}-dllm-operator"
    rules = yaml.safe_load((OPERATOR / "files" / "rbac-rules.yaml").read_text())

    def can(verb: str, resource: str, ns: str = "default") -> bool:
        resource, _, sub = resource.partition("/")
        extra = [f"--subresource={sub}"] if sub else []
        proc = kubectl("auth", "can-i", verb, resource, *extra, "-n", ns, "--as", sa, kubeconfig=kubeconfig,
                       check=False)
        return proc.stdout.strip() == "yes"

    for rule in rules:
        if rule.get("resourceNames"):
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                name, _, sub = resource.partition("/")
                qualified = (f"{name}.{group}" if group else name) + (f"/{sub}" if sub else "")
                for verb in rule["verbs"]:
                    assert can(verb, qualified), f"{sa} cannot {verb} {qualified}"
    # Least privilege: nothing beyond the list.
    assert not can("delete", "inferenceservices.serving.kserve.io")
    assert not can("get", "secrets")
    assert not can("create", "deployments.apps")
    assert not can("get", "configmaps")  # only inferenceservice-config, by name
    helm(kubeconfig, "uninstall", release, "-n", namespace)
