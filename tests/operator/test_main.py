"""`python -m dllm_operator` is kopf's `run` with our handlers: the kopf flags the Deployment uses exist."""

from __future__ import annotations

import subprocess
import sys

import yaml

from tests.cluster import ROOT


def test_cli_accepts_kopf_flags():
    out = subprocess.run([sys.executable, "-m", "dllm_operator", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--all-namespaces", "--namespace", "--standalone", "--liveness", "--verbose"):
        assert flag in out.stdout


def test_deployment_runs_the_module_with_flags_it_accepts():
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "operator" / "deployment.yaml").read_text()))
    (container,) = docs[0]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "dllm_operator"]
    help_text = subprocess.run([sys.executable, "-m", "dllm_operator", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    for arg in container["args"]:
        assert arg.split("=", 1)[0] in help_text
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert docs[0]["spec"]["replicas"] == 1  # kopf --standalone: one replica, no peering
