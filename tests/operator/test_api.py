"""Spec defaults and the validation the CRD schema cannot express."""

from __future__ import annotations

import pytest

from dllm_operator import api
from dllm_operator.config import OperatorSettings

from .conftest import dlm_body


def test_defaults_for_an_hf_model():
    dlm = api.parse(dlm_body(), OperatorSettings(runtime_image="registry.example/dllm:1"))
    assert dlm.cache.mode == "Managed"
    assert dlm.model.revision == "main"
    assert dlm.model.served_model_name == "llada"
    assert dlm.runtime.image == "registry.example/dllm:1"
    assert dlm.serving.deployment_mode == "Auto"
    assert (dlm.serving.min_replicas, dlm.serving.max_replicas) == (1, 1)
    assert dlm.resources.gpus == 1 and dlm.decoding == {}


@pytest.mark.parametrize("uri", ["pvc://models-claim/llada", "oci://quay.io/org/llada-modelcar:1", "s3://bucket/llada"])
def test_non_hf_uris_default_to_storage_initializer(uri):
    assert api.parse(dlm_body(model={"uri": uri})).cache.mode == "None"


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"model": {"uri": "pvc://claim/x"}, "cache": {"mode": "Managed"}}, "cache.mode"),
        ({"cache": {"mode": "Existing"}}, "cache.existingClaimName"),
        ({"cache": {"existingClaimName": "c"}}, "cache.existingClaimName"),
        ({"serving": {"minReplicas": 3, "maxReplicas": 2}}, "serving.maxReplicas"),
        # the runtime's own rule: steps must split evenly over the blocks (256 / 32 = 8 blocks)
        ({"decoding": {"algorithm": "llada", "maxTokens": 256, "blockLength": 32, "steps": 100}}, "decoding.steps"),
        ({"decoding": {"algorithm": "llada", "cache": "dual"}}, "decoding.cache"),
        ({"decoding": {"algorithm": "dream", "cfgScale": 1.5}}, "decoding.cfgScale"),
        ({"decoding": {"topP": 0}}, "decoding.topP"),
        ({"decoding": {"gen_length": 5}}, "decoding.gen_length"),
        ({"runtime": {"args": ["--port=9000"]}}, "runtime.args"),
        ({"resources": {"limits": {"nvidia.com/gpu": "2"}}}, "resources.limits"),
        ({"resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}}, "resources.requests.cpu"),
    ],
)
def test_cross_field_errors_name_the_field(spec, field):
    with pytest.raises(api.SpecError) as info:
        api.parse(dlm_body(**spec))
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


def test_unset_algorithm_accepts_settings_some_model_family_uses():
    # top_p is Dream's; the server picks Dream's sampler for a Dream model when no algorithm is set.
    assert api.parse(dlm_body(model={"uri": "hf://Dream-org/Dream-v0-Instruct-7B"}, decoding={"topP": 0.95}))
    with pytest.raises(api.SpecError, match="decoding.topP"):
        api.parse(dlm_body(decoding={"topP": 1.5}))


def test_long_names_are_rejected_before_kserve_would():
    with pytest.raises(api.SpecError, match="metadata.name"):
        api.parse(dlm_body(name="x" * 54))


def test_valid_decoding_keeps_only_set_fields_in_crd_order():
    dlm = api.parse(dlm_body(decoding={"threshold": 0.9, "algorithm": "fast_dllm", "maxTokens": 256,
                                       "blockLength": 32, "cache": "dual"}))
    assert list(dlm.decoding) == ["algorithm", "maxTokens", "blockLength", "threshold", "cache"]


def test_settings_from_env_validates_numbers():
    s = OperatorSettings.from_env({"DLLM_OPERATOR_RESYNC_SECONDS": "2", "DLLM_OPERATOR_RUNTIME_IMAGE": "img:1"})
    assert s.resync_seconds == 2.0 and s.runtime_image == "img:1"
    with pytest.raises(ValueError, match="DLLM_OPERATOR_RESYNC_SECONDS"):
        OperatorSettings.from_env({"DLLM_OPERATOR_RESYNC_SECONDS": "soon"})
    with pytest.raises(ValueError, match="DLLM_OPERATOR_STARTUP_BUDGET_SECONDS"):
        OperatorSettings.from_env({"DLLM_OPERATOR_STARTUP_BUDGET_SECONDS": "5"})
