"""The CRD file: valid for Kubernetes 1.20 (structural, no CEL, no empty defaults) and in step with the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from dllm_operator import GROUP, KIND, PLURAL, VERSION, api
from dllm_operator.download_state import EXIT_REASONS
from dllm_operator.status import CONDITION_TYPES, PHASES
from dllm_runtime.decoding import params

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "manifests" / "crd" / "serving.dllm.io_diffusionlms.yaml").read_text())
(VERSION_DEF,) = CRD["spec"]["versions"]
SCHEMA = VERSION_DEF["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]["properties"]


def walk(node, path=""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}" if path else key)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], path + "{}")


def test_names_match_the_operator():
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert CRD["spec"]["names"]["kind"] == KIND
    assert CRD["spec"]["names"]["shortNames"] == ["dlm"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION_DEF["name"] == VERSION and VERSION_DEF["subresources"] == {"status": {}}
    columns = [c["name"] for c in VERSION_DEF["additionalPrinterColumns"]]
    assert columns == ["Model", "Phase", "Ready", "URL", "Age"]


def test_structural_and_valid_on_kubernetes_1_20():
    for path, node in walk(SCHEMA):
        assert "x-kubernetes-validations" not in node, path  # CEL needs 1.25+
        if "default" in node:
            assert node["default"] not in ("", None, {}, []), f"{path}: empty default is rejected by 1.20"
        int_or_string = node.get("x-kubernetes-int-or-string")
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        assert "type" in node or int_or_string or preserve, f"{path}: structural schemas need a type"
        assert "description" not in node or isinstance(node["description"], str)


def test_schema_enums_match_the_runtime_and_operator():
    dec = SPEC["decoding"]["properties"]
    assert tuple(dec["algorithm"]["enum"]) == params.ALGORITHMS
    assert tuple(dec["cache"]["enum"]) == params.CACHE_MODES
    assert tuple(dec["remasking"]["enum"]) == params.REMASKING
    assert tuple(dec["alg"]["enum"]) == params.DREAM_ALGS
    assert set(dec) == set(api.DECODING_FLAGS)
    assert tuple(SPEC["serving"]["properties"]["deploymentMode"]["enum"]) == api.DEPLOYMENT_MODES
    assert tuple(SPEC["cache"]["properties"]["mode"]["enum"]) == api.CACHE_MODES
    status = SCHEMA["properties"]["status"]["properties"]
    assert tuple(status["phase"]["enum"]) == PHASES
    assert len(CONDITION_TYPES) == 4 and set(EXIT_REASONS.values()) == {"Unauthorized", "NotFound", "NoSpace"}


def test_schema_defaults_equal_the_operator_defaults():
    """Objects stored without schema defaulting must behave exactly like defaulted ones."""
    pairs = {
        ("model", "revision"): api.ModelSpec.__dataclass_fields__["revision"].default,
        ("cache", "size"): api.CacheSpec.__dataclass_fields__["size"].default,
        ("cache", "retainOnDelete"): api.CacheSpec.__dataclass_fields__["retain_on_delete"].default,
        ("resources", "gpus"): api.ResourcesSpec.__dataclass_fields__["gpus"].default,
        ("resources", "gpuResourceName"): api.ResourcesSpec.__dataclass_fields__["gpu_resource_name"].default,
        ("resources", "sharedMemorySize"): api.ResourcesSpec.__dataclass_fields__["shared_memory_size"].default,
        ("serving", "deploymentMode"): api.ServingSpec.__dataclass_fields__["deployment_mode"].default,
        ("serving", "minReplicas"): api.ServingSpec.__dataclass_fields__["min_replicas"].default,
        ("serving", "maxReplicas"): api.ServingSpec.__dataclass_fields__["max_replicas"].default,
        ("serving", "external"): api.ServingSpec.__dataclass_fields__["external"].default,
        ("serving", "auth"): api.ServingSpec.__dataclass_fields__["auth"].default,
    }
    for (section, key), expected in pairs.items():
        assert SPEC[section]["properties"][key]["default"] == expected, (section, key)
    creds = SPEC["model"]["properties"]["credentialsSecretRef"]["properties"]["key"]["default"]
    assert creds == api.ModelSpec.__dataclass_fields__["credentials_key"].default
    dl = SPEC["cache"]["properties"]["download"]["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(api.DownloadSpec)}
    assert dl["backoffLimit"]["default"] == defaults["backoff_limit"]
    assert dl["maxAttempts"]["default"] == defaults["max_attempts"]
    assert dl["activeDeadlineSeconds"]["default"] == defaults["active_deadline_seconds"]
    assert SPEC["suspend"]["default"] is False


def test_parse_of_schema_defaulted_object_equals_parse_of_bare_object():
    bare = {"metadata": {"name": "m", "namespace": "n"}, "spec": {"model": {"uri": "hf://a/b"}}}
    defaulted = {"metadata": bare["metadata"], "spec": {
        "model": {"uri": "hf://a/b", "revision": "main"},
        "cache": {"size": "50Gi", "retainOnDelete": False,
                  "download": {"backoffLimit": 3, "maxAttempts": 5, "activeDeadlineSeconds": 21600}},
        "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "sharedMemorySize": "2Gi"},
        "serving": {"deploymentMode": "Auto", "minReplicas": 1, "maxReplicas": 1, "external": False, "auth": False},
        "suspend": False}}
    assert api.parse(bare) == api.parse(defaulted)


def test_samples_pass_the_schema_and_the_operator_and_render_valid_children():
    from dllm_operator.config import OperatorSettings
    from dllm_operator.resources import (build_download_job, build_inference_service, build_pvc,
                                         build_serving_runtime, download_target)
    from tests.schema_validation import validate

    samples = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
    assert {p.stem for p in samples} >= {"llada-8b-instruct", "dream-v0-instruct-7b", "d3llm-llada"}
    for path in samples:
        body = yaml.safe_load(path.read_text())
        validate(body)
        body["metadata"].update(namespace="demo", uid="uid-1", generation=1)
        dlm = api.parse(body)
        for obj in (build_pvc(dlm), build_download_job(dlm), build_serving_runtime(dlm, OperatorSettings()),
                    build_inference_service(dlm, download_target(dlm).storage_uri, "Standard", OperatorSettings())):
            if obj is not None:
                validate(obj)
