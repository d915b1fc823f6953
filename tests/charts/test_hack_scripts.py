"""hack/test-cluster.sh and hack/fetch-helm.sh keep their contracts: `up` prints only shell lines (it is
`source`d by the Makefile) and reports unavailability instead of failing; fetch-helm gives real binaries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cluster import ROOT, require_cluster, require_tool

SCRIPT = ROOT / "hack" / "test-cluster.sh"


def run_script(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_scripts_parse() -> None:
    for script in ("test-cluster.sh", "fetch-helm.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "hack" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_up_without_binaries_reports_unavailable_as_one_sourceable_line(tmp_path: Path) -> None:
    env = {"DLLM_CACHE_DIR": str(tmp_path / "cache"), "DLLM_TEST_CLUSTER_DIR": str(tmp_path / "state"),
           "DLLM_TEST_CLUSTER_NO_BUILD": "1"}
    proc = run_script("up", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith('export DLLM_TEST_CLUSTER_UNAVAILABLE="'), proc.stdout
    # What the Makefile does with it:
    sourced = subprocess.run(
        ["bash", "-c", f'source <(bash {SCRIPT} up 2>/dev/null); printf %s "$DLLM_TEST_CLUSTER_UNAVAILABLE"'],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert "not built" in sourced.stdout, sourced.stdout + sourced.stderr
    assert "KUBECONFIG" not in proc.stdout


def test_down_and_status_without_a_cluster(tmp_path: Path) -> None:
    env = {"DLLM_TEST_CLUSTER_DIR": str(tmp_path / "state")}
    assert run_script("down", env=env).returncode == 0
    assert run_script("status", env=env).returncode == 1
    assert run_script("bogus", env=env).returncode == 2


def test_fetch_helm_gives_real_helm3_and_kubectl() -> None:
    helm = require_tool("helm")
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v3."), version
    kubectl = require_tool("kubectl")
    out = subprocess.run([kubectl, "version", "--client", "-o", "yaml"], capture_output=True, text=True,
                         check=True).stdout
    assert "gitVersion: v1." in out
    assert Path(helm).parent == Path(kubectl).parent and not Path(helm).is_relative_to(ROOT), "cached outside"


@pytest.mark.cluster
def test_up_is_idempotent_on_a_running_cluster() -> None:
    kubeconfig = require_cluster()
    state_dir = str(Path(kubeconfig).parent)
    proc = run_script("up", env={"DLLM_TEST_CLUSTER_DIR": state_dir})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f'export KUBECONFIG="{kubeconfig}"'
    assert run_script("status", env={"DLLM_TEST_CLUSTER_DIR": state_dir}).returncode == 0


@pytest.mark.cluster
def test_cluster_runs_the_controllers_the_operator_tests_rely_on() -> None:
    """Service-account tokens, the garbage collector (ownerReferences) and empty strings in custom
    resources (the go-openapi patch) work on the built control plane."""
    import json
    import time
    import uuid

    from tests.cluster import install_crds, kubectl

    kubeconfig = require_cluster()
    ns = f"ctl-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns, kubeconfig=kubeconfig)
    try:
        def eventually(check, what: str, timeout: float = 60) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, f"timed out: {what}"
                time.sleep(0.5)

        def sa_has_token() -> bool:
            proc = kubectl("get", "sa", "default", "-n", ns, "-o", "json", kubeconfig=kubeconfig, check=False)
            return proc.returncode == 0 and bool(json.loads(proc.stdout).get("secrets"))

        eventually(sa_has_token, "the default ServiceAccount and its token Secret")
        owner = json.loads(kubectl("create", "configmap", "owner", "-n", ns, "-o", "json",
                                   kubeconfig=kubeconfig).stdout)
        dependent = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "dependent", "namespace": ns, "ownerReferences": [
                         {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                          "uid": owner["metadata"]["uid"]}]}}
        kubectl("create", "-f", "-", input=json.dumps(dependent), kubeconfig=kubeconfig)
        kubectl("delete", "configmap", "owner", "-n", ns, kubeconfig=kubeconfig)
        eventually(lambda: kubectl("get", "configmap", "dependent", "-n", ns, kubeconfig=kubeconfig,
                                   check=False).returncode != 0, "garbage collection of the dependent")

        install_crds(kubeconfig, [ROOT / "tests" / "crds" / "serving.kserve.io_inferenceservices.yaml"])
        isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": "empty", "namespace": ns, "labels": {"a": ""}},
                "spec": {"predictor": {"model": {"modelFormat": {"name": "dllm"}, "storageUri": ""}}}}
        created = json.loads(kubectl("create", "-f", "-", "-o", "json", input=json.dumps(isvc),
                                     kubeconfig=kubeconfig).stdout)
        assert created["spec"]["predictor"]["model"]["storageUri"] == ""
    finally:
        kubectl("delete", "namespace", ns, "--wait=false", kubeconfig=kubeconfig, check=False)
