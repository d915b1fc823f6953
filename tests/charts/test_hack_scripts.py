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
