"""charts/dllm-serving with the real Helm binary: lint, render realistic value sets, validate every object
strictly against the real schemas, check that the pieces reference each other, and that the values
schema rejects bad input."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.charts.conftest import SERVING, by_kind, one, set_args
from tests.schema_validation import errors

# Realistic value sets (what a user of OpenShift AI / plain KServe would pass).
VALUE_SETS: dict[str, dict[str, object]] = {
    "defaults": {},
    "rhoai-hf-serverless-auth": {
        "model.name": "dream-7b",
        "model.source": "hf",
        "model.repoId": "Dream-org/Dream-v0-Instruct-7B",
        "model.revision": "05334cb9faaf763692dcf9d8737c642be2b2a6ae",
        "model.hfTokenSecret": {"name": "hf-token", "key": "token"},
        "inferenceService.deploymentMode": "Serverless",
        "inferenceService.minReplicas": 0,
        "inferenceService.maxReplicas": 3,
        "inferenceService.auth": True,
        "inferenceService.expose": False,
        "runtime.decoding": {"algorithm": "dream", "steps": 256, "blockLength": None, "threshold": None, "cache": ""},
    },
    "s3-cpu-servicemonitor": {
        "model.name": "d3llm-llada",
        "model.source": "uri",
        "model.storageUri": "s3://models/d3llm-llada",
        "image.tag": "0.1.0-cpu",
        "inferenceService.resources": {"requests": {"cpu": "8", "memory": "40Gi"}, "limits": {"memory": "48Gi"}},
        "inferenceService.serviceAccountName": "s3-reader",
        "inferenceService.nodeSelector": {"node-role.kubernetes.io/worker": ""},
        "runtime.dtype": "float32",
        "runtime.maxModelLen": 4096,
        "runtime.decoding": {"algorithm": "d3llm", "steps": None, "blockLength": 32, "threshold": 0.9, "cache": "dual"},
        "runtime.apiKeySecret": {"name": "dllm-api-key", "key": "API_KEY"},
        "runtime.extraEnv": [{"name": "OMP_NUM_THREADS", "value": "8"}],
        "monitoring.kind": "ServiceMonitor",
        "monitoring.labels": {"release": "prometheus"},
    },
    "gpu-existing-claim-shared-runtime": {
        "model.name": "llada-15",
        "model.repoId": "GSAI-ML/LLaDA-1.5",
        "cache.existingClaim": "shared-models",
        "cache.subPath": "llada/1.5",
        "runtime.create": False,
        "runtime.name": "dllm-serve",
        "inferenceService.deploymentMode": "Standard",
        "inferenceService.minReplicas": 2,
        "inferenceService.maxReplicas": 4,
        "inferenceService.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "monitoring.enabled": False,
        "download.ttlSecondsAfterFinished": 3600,
    },
}

# Values the schema (or the chart) must refuse, with a fragment the error must name.
BAD_VALUES: dict[str, tuple[dict[str, object], str]] = {
    "uppercase-model-name": ({"model.name": "Bad_Name"}, "/model/name"),
    "model-name-too-long": ({"model.name": "m" * 46}, "/model/name"),
    "unknown-source": ({"model.source": "s3"}, "/model/source"),
    "misspelled-top-level-key": ({"replicas": 2}, "replicas"),
    "misspelled-nested-key": ({"inferenceService.minReplica": 1}, "minReplica"),
    "unknown-deployment-mode": ({"inferenceService.deploymentMode": "Raw"}, "/inferenceService/deploymentMode"),
    "uri-without-storage-uri": ({"model.source": "uri"}, "/model/storageUri"),
    "threshold-above-one": ({"runtime.decoding.threshold": 1.5}, "/runtime/decoding/threshold"),
    "unknown-cache-mode": ({"runtime.decoding.cache": "full"}, "/runtime/decoding/cache"),
    "unknown-monitor-kind": ({"monitoring.kind": "Probe"}, "/monitoring/kind"),
    "bad-access-mode": ({"cache.accessModes": ["RWO"]}, "/cache/accessModes"),
    "repo-id-without-org": ({"model.repoId": "LLaDA-8B-Instruct"}, "/model/repoId"),
    "raw-deployment-scaled-to-zero": ({"inferenceService.minReplicas": 0}, "/inferenceService/minReplicas"),
    "string-max-num-seqs": ({"runtime.maxNumSeqs": "16"}, "/runtime/maxNumSeqs"),
    "zero-startup-budget": ({"runtime.startupProbe.failureThreshold": 0}, "/runtime/startupProbe/failureThreshold"),
    "bad-scrape-interval": ({"monitoring.interval": "30 seconds"}, "/monitoring/interval"),
}


def server_env_names() -> set[str] | None:
    """DLLM_* variables `dllm-serve serve` reads (None until the server's flag table has landed)."""
    try:
        from dllm_runtime.server import args
    except ImportError:
        return None
    return {o.env for o in (*args.SERVER_OPTIONS, *args.DECODING_OPTIONS)}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(SERVING), *set_args(VALUE_SETS[name])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates_strictly(render, name: str) -> None:
    objs = render(SERVING, VALUE_SETS[name])
    assert objs
    for obj in objs:
        assert errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_runtime_and_inferenceservice_fit_together(render, name: str) -> None:
    values = VALUE_SETS[name]
    objs = render(SERVING, values)
    isvc = one(objs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["metadata"]["name"] == values.get("model.name", "demo")
    if values.get("runtime.create", True):
        rt = one(objs, "ServingRuntime")
        assert model["runtime"] == rt["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    else:
        assert not by_kind(objs, "ServingRuntime")
        assert model["runtime"] == values["runtime.name"]
    mode = values.get("inferenceService.deploymentMode", "RawDeployment")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == mode
    assert isvc["spec"]["predictor"]["minReplicas"] == values.get("inferenceService.minReplicas", 1)


def test_servingruntime_follows_the_kserve_and_rhoai_contract(render) -> None:
    rt = one(render(SERVING), "ServingRuntime")
    container = rt["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    # KServe substitutes {{.Name}}; Helm must have left it literally in place.
    assert container["args"][:3] == ["--model=/mnt/models", "--served-model-name={{.Name}}", "--port=8080"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/{{.Name}}/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "weights need a long startup budget"
    assert rt["spec"]["annotations"]["prometheus.io/port"] == "8080"
    assert rt["spec"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert rt["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    assert rt["metadata"]["annotations"]["opendatahub.io/recommended-accelerators"] == '["nvidia.com/gpu"]'
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "runAsUser" not in sc, "restricted-v2 assigns the UID"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_runtime_env_only_uses_flags_the_server_reads(render, name: str) -> None:
    known = server_env_names()
    if known is None:
        pytest.skip("dllm_runtime.server.args not importable yet (server not landed)")
    objs = render(SERVING, VALUE_SETS[name])
    for rt in by_kind(objs, "ServingRuntime"):
        env = {e["name"] for e in rt["spec"]["containers"][0]["env"]}
        unknown = {n for n in env if n.startswith("DLLM_")} - known
        assert not unknown, f"ServingRuntime sets DLLM_* variables the server ignores: {sorted(unknown)}"


def test_decoding_defaults_reach_the_server_environment(render) -> None:
    objs = render(SERVING, VALUE_SETS["s3-cpu-servicemonitor"])
    env = {e["name"]: e for e in one(objs, "ServingRuntime")["spec"]["containers"][0]["env"]}
    assert env["DLLM_ALGORITHM"]["value"] == "d3llm"
    assert env["DLLM_BLOCK_LENGTH"]["value"] == "32"
    assert env["DLLM_THRESHOLD"]["value"] == "0.9"
    assert env["DLLM_CACHE"]["value"] == "dual"
    assert env["DLLM_MAX_MODEL_LEN"]["value"] == "4096"
    assert "DLLM_STEPS" not in env, "an unset decoding default must keep the model family's own"
    assert env["DLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "dllm-api-key", "key": "API_KEY"}
    assert env["OMP_NUM_THREADS"]["value"] == "8"


def test_download_source_wires_pvc_job_and_storage_uri(render) -> None:
    objs = render(SERVING)
    pvc, job, isvc = one(objs, "PersistentVolumeClaim"), one(objs, "Job"), one(objs, "InferenceService")
    claim = pvc["metadata"]["name"]
    job_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    sub_path = job_env["OUTPUT"].removeprefix("/cache/")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"pvc://{claim}/{sub_path}"
    assert job_env["REPO_ID"] == "GSAI-ML/LLaDA-8B-Instruct"
    assert {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v} == {claim}
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The predictor waits for exactly the marker the Job writes, on the same claim and folder.
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    init = isvc["spec"]["predictor"]["initContainers"][0]
    marker = script.strip().splitlines()[-1].split("/")[-1].rstrip('"')
    assert marker in init["args"][0]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert init_env["SUBPATH"] == sub_path and init_env["CLAIM"] == claim
    assert isvc["spec"]["predictor"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_download_job_keeps_values_out_of_the_shell_script(render) -> None:
    evil = "x; rm -rf /"
    objs = render(SERVING, {"model.revision": "v1.0"})
    script = one(objs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "v1.0" not in script and '"$REVISION"' in script
    with pytest.raises(AssertionError):  # the schema refuses shell metacharacters outright
        render(SERVING, {"model.revision": evil})


def test_download_job_name_changes_with_what_it_downloads(render) -> None:
    def job_name(values: dict) -> str:
        return one(render(SERVING, values), "Job")["metadata"]["name"]

    base = job_name({})
    assert job_name({}) == base, "rendering must be deterministic (helm upgrade must not recreate the Job)"
    assert job_name({"model.revision": "refs-pr-1"}) != base
    assert job_name({"model.repoId": "GSAI-ML/LLaDA-1.5"}) != base
    assert len(job_name({"fullnameOverride": "x" * 63})) <= 63


def test_serverless_download_waits_in_the_server_not_an_init_container(render) -> None:
    isvc = one(render(SERVING, {"inferenceService.deploymentMode": "Serverless", "download.modelWaitSeconds": 900}),
               "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert "initContainers" not in predictor and "volumes" not in predictor
    assert predictor["model"]["args"] == ["--model-wait-timeout=900"]
    known = server_env_names()
    if known is not None:
        assert "DLLM_MODEL_WAIT_TIMEOUT" in known, "the flag the chart passes must exist"


def test_existing_claim_is_used_not_created(render) -> None:
    objs = render(SERVING, VALUE_SETS["gpu-existing-claim-shared-runtime"])
    assert not by_kind(objs, "PersistentVolumeClaim")
    isvc = one(objs, "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://shared-models/llada/1.5"
    assert one(objs, "Job")["spec"]["ttlSecondsAfterFinished"] == 3600


def test_hf_source_needs_no_pvc_and_passes_revision_and_token(render) -> None:
    objs = render(SERVING, VALUE_SETS["rhoai-hf-serverless-auth"])
    assert not by_kind(objs, "PersistentVolumeClaim") and not by_kind(objs, "Job")
    isvc = one(objs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == "hf://Dream-org/Dream-v0-Instruct-7B:05334cb9faaf763692dcf9d8737c642be2b2a6ae"
    assert model["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert "initContainers" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["security.opendatahub.io/enable-auth"] == "true"
    assert "networking.kserve.io/visibility" not in isvc["metadata"]["labels"]
    rules = one(objs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert "DllmNoReadyReplica" not in {r["alert"] for r in rules}, "scale-to-zero is not an outage"


def test_monitoring_kinds_follow_values(render) -> None:
    default = render(SERVING)
    pm = one(default, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http1"
    assert pm["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "demo"}
    sm_objs = render(SERVING, VALUE_SETS["s3-cpu-servicemonitor"])
    sm = one(sm_objs, "ServiceMonitor")
    assert not by_kind(sm_objs, "PodMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["targetPort"] == 8080
    off = render(SERVING, VALUE_SETS["gpu-existing-claim-shared-runtime"])
    assert not {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"} & {o["kind"] for o in off}


def test_alerts_select_this_model(render) -> None:
    rules = one(render(SERVING, {"model.name": "m1"}), "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert {"DllmNoReadyReplica", "DllmHighErrorRate", "DllmQueueSaturated", "DllmHighLatency",
            "DllmSlowFirstToken"} <= set(alerts)
    for rule in rules:
        assert 'model_name="m1"' in rule["expr"] or '"m1' in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["runbook_url"].startswith("https://")


def test_every_runbook_anchor_is_a_troubleshooting_section(render) -> None:
    from tests.cluster import ROOT

    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, re.MULTILINE)}
    rules = one(render(SERVING), "PrometheusRule")["spec"]["groups"][0]["rules"]
    for rule in rules:
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path.endswith("docs/troubleshooting.md") and anchor in anchors, rule["alert"]


@pytest.mark.parametrize("name", BAD_VALUES)
def test_schema_rejects_bad_values(helm: str, name: str) -> None:
    values, fragment = BAD_VALUES[name]
    proc = subprocess.run([helm, "template", "demo", str(SERVING), *set_args(values)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"{name} was accepted"
    assert fragment in proc.stderr, proc.stderr
