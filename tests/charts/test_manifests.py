"""Every shipped manifest validates strictly; the plain manifests and chart copies have not drifted from
their one source; the RHOAI Template carries what the OpenShift AI dashboard needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster import ROOT, require_tool
from tests.schema_validation import errors

MANIFESTS = ROOT / "manifests"
TEMPLATE = MANIFESTS / "rhoai" / "servingruntime-template.yaml"
RHOAI_TEMPLATE_ANNOTATIONS = (
    "openshift.io/display-name",
    "opendatahub.io/modelServingSupport",
    "opendatahub.io/apiProtocol",
    "opendatahub.io/model-type",
    "opendatahub.io/recommended-accelerators",
    "opendatahub.io/runtime-version",
)


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_validates_strictly(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc["kind"] == "Template":
            # In OpenShift a Template's objects are RawExtensions (any object); the CRD copy in tests/crds
            # says only `type: object`. Validate the Template without them and each object on its own.
            for i, obj in enumerate(substitute_parameters(doc)):
                assert errors(obj) == [], f"{path}: objects[{i}]"
            doc = {**doc, "objects": []}
        assert errors(doc) == [], f"{path}: {doc['kind']} {doc['metadata'].get('name')}"


def substitute_parameters(template: dict) -> list[dict]:
    """The Template's objects with ${PARAM} replaced by each parameter's value, as `oc process` does."""
    values = {p["name"]: p.get("value", "") for p in template.get("parameters") or []}
    text = json.dumps(template["objects"])
    missing = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text)) - set(values)
    assert not missing, f"Template uses undeclared parameters {missing}"
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return json.loads(text)


def test_rhoai_template_is_what_the_dashboard_lists() -> None:
    template = yaml.safe_load(TEMPLATE.read_text())
    assert template["kind"] == "Template"
    assert template["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    annotations = template["metadata"]["annotations"]
    for key in RHOAI_TEMPLATE_ANNOTATIONS:
        assert annotations.get(key), f"Template lacks {key}"
    assert json.loads(annotations["opendatahub.io/modelServingSupport"]) == ["single"]
    assert json.loads(annotations["opendatahub.io/recommended-accelerators"]) == ["nvidia.com/gpu"]
    assert annotations["opendatahub.io/apiProtocol"] == "REST"
    objects = substitute_parameters(template)
    assert [o["kind"] for o in objects] == ["ServingRuntime"]
    runtime = objects[0]
    assert errors(runtime) == []
    assert runtime["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    assert runtime["spec"]["annotations"]["prometheus.io/port"] == "8080"
    args = runtime["spec"]["containers"][0]["args"]
    assert "--model=/mnt/models" in args and "--served-model-name={{.Name}}" in args and "--port=8080" in args


def test_generated_manifests_and_chart_copies_are_current() -> None:
    require_tool("helm")
    proc = subprocess.run([sys.executable, str(ROOT / "hack" / "render-manifests.py"), "--check"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_grafana_dashboard_is_valid_and_complete() -> None:
    dash = json.loads((MANIFESTS / "monitoring" / "dllm-serving-dashboard.json").read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
    cm = yaml.safe_load((MANIFESTS / "monitoring" / "grafana-dashboard.yaml").read_text())
    assert json.loads(cm["data"]["dllm-serving.json"]) == dash
