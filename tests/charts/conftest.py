"""Fixtures for the chart tests: the real Helm 3 binary (hack/fetch-helm.sh) and a renderer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.cluster import ROOT, require_tool

CHARTS = ROOT / "charts"
SERVING = CHARTS / "dllm-serving"
OPERATOR = CHARTS / "dllm-operator"


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("helm")


def set_args(values: dict[str, object]) -> list[str]:
    """`--set-json key=<json>` for each entry: exact types (no --set string/number guessing)."""
    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


Render = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """render(chart, values: dict, namespace="ns") -> the rendered objects (helm template, real binary)."""

    cache: dict[str, str] = {}

    def _render(chart: Path, values: dict[str, object] | None = None, namespace: str = "team-a",
                release: str = "demo") -> list[dict]:
        # Helm is slow on a busy 2-core machine: identical renders are done once per session.
        key = json.dumps([str(chart), values or {}, namespace, release], sort_keys=True)
        if key in cache:
            return [d for d in yaml.safe_load_all(cache[key]) if d]
        proc = subprocess.run([helm, "template", release, str(chart), "--namespace", namespace,
                               *set_args(values or {})], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"helm template {chart.name} failed:\n{proc.stderr}")
        cache[key] = proc.stdout
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return _render


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
