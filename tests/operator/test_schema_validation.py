"""The strict validator itself: it must accept what we ship and reject what the API server would drop."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.schema_validation import SchemaError, errors, validate, validate_documents

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "manifests" / "crd" / "serving.dllm.io_diffusionlms.yaml"


def test_shipped_operator_manifests_validate():
    for path in sorted((ROOT / "manifests" / "operator").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        assert validate_documents(path.read_text()), path


def test_crd_document_itself_validates_as_apiextensions_v1():
    validate_documents(CRD.read_text())


def test_misspelled_core_field_is_rejected():
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    validate(pvc)
    bad = copy.deepcopy(pvc)
    bad["spec"]["storageClass"] = "fast"  # the real field is storageClassName
    with pytest.raises(SchemaError, match="spec.storageClass: unknown field"):
        validate(bad)
    bad = copy.deepcopy(pvc)
    bad["metadata"]["label"] = {"a": "b"}
    assert any("metadata.label" in p for p in errors(bad))


def test_core_wrong_type_and_missing_required_are_rejected():
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j"},
        "spec": {"backoffLimit": "3", "template": {"spec": {"containers": [{"image": "x"}]}}},
    }
    problems = errors(job)
    assert any(p.startswith("spec.backoffLimit: expected an integer") for p in problems)
    assert any(p.startswith("spec.template.spec.containers[0].name: required") for p in problems)


def test_misspelled_custom_resource_field_is_rejected():
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "m"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "dllm"}, "storageUri": "pvc://c/p"}}},
    }
    validate(isvc)
    isvc["spec"]["predictor"]["model"]["storageURI"] = "pvc://c/p"
    with pytest.raises(SchemaError, match="storageURI"):
        validate(isvc)


def test_unknown_kind_is_an_error_not_a_pass():
    assert errors({"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "n"}})


def test_our_crd_rejects_out_of_range_and_unknown_spec_fields():
    ok = {
        "apiVersion": "serving.dllm.io/v1alpha1",
        "kind": "DiffusionLM",
        "metadata": {"name": "llada"},
        "spec": {"model": {"uri": "hf://GSAI-ML/LLaDA-8B-Instruct"}},
    }
    validate(ok)
    for mutate in (
        lambda s: s["model"].update(uri="http://example.com/x"),
        lambda s: s.update(decoding={"cache": "full"}),
        lambda s: s.update(decoding={"steps": 0}),
        lambda s: s.update(serving={"minReplica": 1}),
    ):
        bad = copy.deepcopy(ok)
        mutate(bad["spec"])
        assert errors(bad), bad["spec"]
    assert yaml.safe_load(CRD.read_text())["spec"]["names"]["shortNames"] == ["dlm"]
