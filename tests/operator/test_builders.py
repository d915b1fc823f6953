"""Builders: what each child looks like, and that every emitted object passes the real schemas strictly."""

from __future__ import annotations

import argparse

import pytest

from dllm_operator import api
from dllm_operator.config import OperatorSettings
from dllm_operator.resources import (
    build_download_job,
    build_inference_service,
    build_pvc,
    build_serving_runtime,
    download_target,
    resolve_deployment_mode,
    runtime_args,
)
from dllm_operator.resources.mode import kserve_default_mode
from tests.schema_validation import validate

from .conftest import dlm_body

SETTINGS = OperatorSettings(runtime_image="quay.io/dllm-serve/dllm-serve:test", startup_budget_seconds=1800)
OWNER = {"managed-by": "dllm-operator"}

FULL_SPEC = dict(
    model={"uri": "hf://GSAI-ML/LLaDA-8B-Instruct", "revision": "v1.0", "credentialsSecretRef": {"name": "hf-token"},
           "servedModelName": "llada-8b-instruct"},
    cache={"size": "40Gi", "storageClassName": "gp3", "accessModes": ["ReadWriteMany"],
           "download": {"backoffLimit": 2, "maxAttempts": 3, "activeDeadlineSeconds": 3600}},
    decoding={"algorithm": "fast_dllm", "maxTokens": 256, "blockLength": 32, "threshold": 0.9, "cache": "dual"},
    runtime={"imagePullPolicy": "IfNotPresent", "dtype": "bfloat16", "maxNumSeqs": 32, "maxModelLen": 4096,
             "args": ["--max-waiting=64"], "env": [{"name": "LOG_LEVEL", "value": "debug"}]},
    resources={"gpus": 2, "requests": {"cpu": "4", "memory": "48Gi"}, "limits": {"memory": "64Gi"},
               "sharedMemorySize": "8Gi"},
    scheduling={"nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "runtimeClassName": "nvidia", "priorityClassName": "inference"},
    serving={"deploymentMode": "Standard", "minReplicas": 1, "maxReplicas": 3, "external": True, "auth": True,
             "timeoutSeconds": 300, "displayName": "LLaDA 8B Instruct"},
)


def parsed(**spec):
    return api.parse(dlm_body(**spec), SETTINGS)


def all_children(dlm, mode="Standard"):
    target = download_target(dlm)
    uri = target.storage_uri if target else dlm.model.uri
    return [o for o in (build_pvc(dlm), build_download_job(dlm), build_serving_runtime(dlm, SETTINGS),
                        build_inference_service(dlm, uri, mode, SETTINGS)) if o is not None]


@pytest.mark.parametrize("spec", [{}, FULL_SPEC, {"model": {"uri": "oci://quay.io/org/llada:1"}},
                                  {"cache": {"mode": "Existing", "existingClaimName": "shared-models"},
                                   "runtime": {"servingRuntimeName": "my-runtime"}, "suspend": True}])
def test_every_child_validates_strictly_against_real_schemas(spec):
    for obj in all_children(parsed(**spec)):
        validate(obj)


def test_children_are_owned_and_labelled():
    dlm = parsed()
    for obj in all_children(dlm):
        meta = obj["metadata"]
        assert meta["namespace"] == "models"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "dllm-operator"
        assert meta["labels"]["serving.dllm.io/diffusionlm"] == "llada"
        (ref,) = meta["ownerReferences"]
        assert ref == {"apiVersion": "serving.dllm.io/v1alpha1", "kind": "DiffusionLM", "name": "llada",
                       "uid": dlm.uid, "controller": True, "blockOwnerDeletion": True}


def test_retained_cache_pvc_has_no_owner():
    pvc = build_pvc(parsed(cache={"retainOnDelete": True}))
    assert "ownerReferences" not in pvc["metadata"]
    assert pvc["metadata"]["labels"]["serving.dllm.io/diffusionlm"] == "llada"


def test_pvc_spec():
    pvc = build_pvc(parsed(**FULL_SPEC))
    assert pvc["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert pvc["spec"]["storageClassName"] == "gp3"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert build_pvc(parsed(model={"uri": "s3://b/p"})) is None
    assert build_pvc(parsed(cache={"mode": "Existing", "existingClaimName": "c"})) is None


def test_download_job_runs_dllm_serve_download_into_the_claim():
    dlm = parsed(**FULL_SPEC)
    job = build_download_job(dlm)
    target = download_target(dlm)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == SETTINGS.runtime_image
    assert c["command"] == ["dllm-serve", "download"]
    args = c["args"]
    assert args[args.index("--repo-id") + 1] == "GSAI-ML/LLaDA-8B-Instruct"
    assert args[args.index("--revision") + 1] == "v1.0"
    assert args[args.index("--output") + 1] == "/cache/" + target.path
    assert args[args.index("--termination-log") + 1] == c["terminationMessagePath"] == "/dev/termination-log"
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    claim = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert claim["persistentVolumeClaim"]["claimName"] == target.claim_name == "llada-model-cache"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["metadata"]["annotations"]["serving.dllm.io/attempt"] == "1"
    assert build_download_job(dlm, attempt=3)["metadata"]["annotations"]["serving.dllm.io/attempt"] == "3"
    assert pod["restartPolicy"] == "Never"
    assert target.storage_uri == "pvc://llada-model-cache/models/GSAI-ML/LLaDA-8B-Instruct/v1.0"


def test_new_revision_gets_new_job_and_directory_same_revision_same_job():
    a, b = download_target(parsed()), download_target(parsed())
    c = download_target(parsed(model={"uri": "hf://GSAI-ML/LLaDA-8B-Instruct", "revision": "abc123"}))
    assert a == b
    assert c.job_name != a.job_name and c.path != a.path and c.claim_name == a.claim_name
    long = download_target(api.parse(dlm_body(name="x" * 53)))
    assert len(long.job_name) <= 63


def test_restricted_v2_security_everywhere():
    dlm = parsed(**FULL_SPEC)
    job = build_download_job(dlm)
    sr = build_serving_runtime(dlm, SETTINGS)
    containers = job["spec"]["template"]["spec"]["containers"] + sr["spec"]["containers"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in job["spec"]["template"]["spec"]["securityContext"]  # any UID
    for c in containers:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "runAsUser" not in sc and not sc.get("privileged")
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts  # writable scratch in a volume


def test_serving_runtime_follows_kserve_and_rhoai_conventions():
    dlm = parsed(**FULL_SPEC)
    sr = build_serving_runtime(dlm, SETTINGS)
    assert sr["metadata"]["name"] == "llada"  # same name as the InferenceService (RHOAI pairs them)
    assert sr["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    assert sr["spec"]["annotations"] == {"prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    assert sr["spec"]["supportedModelFormats"][0]["name"] == "dllm"
    (c,) = sr["spec"]["containers"]
    assert c["args"] == ["--model=/mnt/models", "--port=8080"]
    assert c["ports"][0]["containerPort"] == 8080
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models/llada-8b-instruct"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/v1/models/llada-8b-instruct"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # room to load an 8B model
    shm = next(v for v in sr["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert build_serving_runtime(parsed(runtime={"servingRuntimeName": "vllm-like"}), SETTINGS) is None


def test_inference_service_spec_and_annotations():
    dlm = parsed(**FULL_SPEC)
    isvc = build_inference_service(dlm, "pvc://c/p", "Standard", SETTINGS)
    meta = isvc["metadata"]
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert meta["annotations"]["security.opendatahub.io/enable-auth"] == "true"
    assert meta["annotations"]["openshift.io/display-name"] == "LLaDA 8B Instruct"
    assert meta["annotations"]["serving.kserve.io/stop"] == "false"
    assert meta["labels"]["networking.kserve.io/visibility"] == "exposed"
    assert meta["labels"]["opendatahub.io/dashboard"] == "true"
    pred = isvc["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["timeout"]) == (1, 3, 300)
    assert pred["nodeSelector"] == {"gpu": "h100"} and pred["runtimeClassName"] == "nvidia"
    model = pred["model"]
    assert model["modelFormat"] == {"name": "dllm"} and model["runtime"] == "llada"
    assert model["storageUri"] == "pvc://c/p"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert model["resources"]["requests"]["memory"] == "48Gi"
    assert "readinessProbe" not in model  # our runtime has them
    internal = build_inference_service(parsed(), "pvc://c/p", "RawDeployment", SETTINGS)
    assert "networking.kserve.io/visibility" not in internal["metadata"]["labels"]
    assert internal["metadata"]["annotations"]["security.opendatahub.io/enable-auth"] == "false"


def test_suspend_stops_through_kserve_annotation():
    isvc = build_inference_service(parsed(suspend=True), "pvc://c/p", "Standard", SETTINGS)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/stop"] == "true"


def test_existing_runtime_gets_probes_on_the_model():
    isvc = build_inference_service(parsed(runtime={"servingRuntimeName": "shared"}), "s3://b/p", "Standard", SETTINGS)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "shared"
    assert model["readinessProbe"]["httpGet"]["path"] == "/v1/models/llada"


def test_runtime_args_are_accepted_by_the_real_dllm_serve_parser():
    """Cross-team contract: every flag the operator renders exists in `dllm-serve serve`."""
    from dllm_runtime.server.args import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    spec = dict(FULL_SPEC)
    spec["decoding"] = {"algorithm": "llada", "steps": 64, "maxTokens": 128, "blockLength": 32, "temperature": 0.5,
                        "remasking": "random", "cfgScale": 1.0}
    args = runtime_args(parsed(**spec))
    sr_args = build_serving_runtime(parsed(), SETTINGS)["spec"]["containers"][0]["args"]
    ns = parser.parse_args(sr_args + args)
    assert ns.served_model_name == "llada-8b-instruct" and ns.model == "/mnt/models" and ns.port == 8080
    assert (ns.algorithm, ns.steps, ns.default_max_tokens, ns.block_length) == ("llada", 64, 128, 32)
    assert (ns.temperature, ns.remasking, ns.cfg_scale, ns.max_waiting) == (0.5, "random", 1.0, 64)
    assert (ns.dtype, ns.max_num_seqs, ns.max_model_len) == ("bfloat16", 32, 4096)
    fast = {"algorithm": "fast_dllm", "threshold": 0.8, "factor": 1.5, "cache": "prefix"}
    ns = parser.parse_args(runtime_args(parsed(decoding=fast)))
    assert (ns.threshold, ns.factor, ns.cache) == (0.8, 1.5, "prefix")
    dream = {"algorithm": "dream", "alg": "entropy", "algTemp": 0.1, "eps": 0.001, "topP": 0.9, "topK": 50}
    ns = parser.parse_args(runtime_args(parsed(decoding=dream)))
    assert (ns.alg, ns.alg_temp, ns.eps, ns.top_p, ns.top_k) == ("entropy", 0.1, 0.001, 0.9, 50)
    d3 = {"algorithm": "d3llm", "blockAddThreshold": 0.1, "decodedTokenThreshold": 0.95}
    ns = parser.parse_args(runtime_args(parsed(decoding=d3)))
    assert (ns.block_add_threshold, ns.decoded_token_threshold) == (0.1, 0.95)


@pytest.mark.parametrize(
    "requested, kserve_default, expected",
    [
        ("Auto", None, "RawDeployment"),  # unknown KServe: the spelling every release accepts
        ("Auto", "Standard", "Standard"),
        ("Auto", "Knative", "Knative"),
        ("Auto", "Serverless", "Serverless"),
        ("Auto", "RawDeployment", "RawDeployment"),
        ("Auto", "ModelMesh", "RawDeployment"),
        ("Standard", "RawDeployment", "RawDeployment"),  # old KServe does not know "Standard"
        ("RawDeployment", "Standard", "Standard"),
        ("Serverless", "Standard", "Knative"),
        ("Knative", None, "Serverless"),
    ],
)
def test_deployment_mode_survives_the_rename(requested, kserve_default, expected):
    assert resolve_deployment_mode(requested, kserve_default) == expected


def test_kserve_default_mode_from_configmap():
    cm = {"data": {"deploy": '{"defaultDeploymentMode": "Standard"}'}}
    assert kserve_default_mode(cm) == "Standard"
    assert kserve_default_mode({"data": {"deploy": "not json"}}) is None
    assert kserve_default_mode({"data": {}}) is None and kserve_default_mode(None) is None
