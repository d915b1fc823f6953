"""Cluster tier: the real operator (kopf, `python -m dllm_operator`) against a real kube-apiserver + etcd.

The operator runs in a subprocess authenticated as its own ServiceAccount, bound to the ClusterRole of
manifests/operator/rbac.yaml: a missing permission fails these tests, so the shipped RBAC is proven
sufficient. kube-controller-manager runs the garbage collector and the Job controller. What cannot run
here is simulated by patching status, as KServe's controller or a kubelet would: the Job's
Complete/Failed condition, a download pod's termination message, the InferenceService's readiness.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from dllm_operator.kube import Kube, KubeError
from tests.cluster import install_crds, kubectl, require_cluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRDS = [
    ROOT / "manifests" / "crd" / "serving.dllm.io_diffusionlms.yaml",
    ROOT / "tests" / "crds" / "serving.kserve.io_servingruntimes.yaml",
    ROOT / "tests" / "crds" / "serving.kserve.io_clusterservingruntimes.yaml",
    ROOT / "tests" / "crds" / "serving.kserve.io_inferenceservices.yaml",
]
DLM = ("serving.dllm.io/v1alpha1", "DiffusionLM")
ISVC = ("serving.kserve.io/v1beta1", "InferenceService")
SR = ("serving.kserve.io/v1alpha1", "ServingRuntime")
JOB = ("batch/v1", "Job")
PVC = ("v1", "PersistentVolumeClaim")
NS_PREFIX = "dlmtest-"
#: generous: a passing check returns at once, and kube-controller-manager's garbage collector took
#: over 60 s to collect a child on a 2-core machine busy with another test run
TIMEOUT = float(os.environ.get("DLLM_OPERATOR_TEST_TIMEOUT", "120"))


def eventually(check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.5, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value (returned) or raise with the last failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except (AssertionError, KubeError, KeyError, TypeError, IndexError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}\n"
                         f"operator log (timer lines left out):\n{operator_log_tail()}")


OPERATOR_LOG: list[Path] = []


def operator_log_tail(chars: int = 6000) -> str:
    if not OPERATOR_LOG or not OPERATOR_LOG[0].exists():
        return "(operator not started)"
    lines = [line for line in OPERATOR_LOG[0].read_text().splitlines()
             if "Timer 'resync' succeeded" not in line and "Handler 'on_child_event' succeeded" not in line]
    return "\n".join(lines)[-chars:]


def admin_kube(kubeconfig: str) -> Kube:
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    return Kube(config)


def service_account_kubeconfig(kube: Kube, admin_kubeconfig: str, path: Path) -> Path:
    """A kubeconfig that authenticates as dllm-operator/dllm-operator through its token Secret."""
    sa = eventually(lambda: (kube.get("v1", "ServiceAccount", "dllm-operator", "dllm-operator") or {}).get("secrets"),
                    what="the ServiceAccount token Secret")
    secret = kube.request("GET", f"/api/v1/namespaces/dllm-operator/secrets/{sa[0]['name']}")
    token = base64.b64decode(secret["data"]["token"]).decode()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
    }))
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, Kube]]:
    kubeconfig = require_cluster()
    install_crds(kubeconfig, CRDS)
    kube = admin_kube(kubeconfig)
    ops = ROOT / "manifests" / "operator"
    for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        kubectl("apply", "-f", str(ops / name), kubeconfig=kubeconfig)
    # KServe's config, as the kserve install ships it (new vocabulary): deploymentMode Auto must follow it.
    kubectl("apply", "-f", "-", kubeconfig=kubeconfig, input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kserve"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "inferenceservice-config", "namespace": "kserve"},
         "data": {"deploy": json.dumps({"defaultDeploymentMode": "Standard"})}},
    ]))
    yield kubeconfig, kube
    kube.close()


@pytest.fixture(scope="module")
def operator(cluster) -> Iterator[Kube]:
    kubeconfig, kube = cluster
    workdir = Path(tempfile.mkdtemp(prefix="dllm-operator-test-"))
    sa_config = service_account_kubeconfig(kube, kubeconfig, workdir / "kubeconfig")
    log_path = workdir / "operator.log"
    OPERATOR_LOG[:] = [log_path]
    env = {**os.environ, "KUBECONFIG": str(sa_config), "DLLM_OPERATOR_RESYNC_SECONDS": "1",
           "DLLM_OPERATOR_DOWNLOAD_RETRY_BASE_SECONDS": "1", "DLLM_OPERATOR_DOWNLOAD_RETRY_MAX_SECONDS": "2",
           "DLLM_OPERATOR_RUNTIME_IMAGE": "registry.test/dllm-serve:test", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        # Only the namespaces of these tests (a glob: exercises kopf's namespace observation and its RBAC),
        # so objects other test modules create elsewhere in the shared cluster are left alone.
        proc = subprocess.Popen([sys.executable, "-m", "dllm_operator", f"--namespace={NS_PREFIX}*", "--standalone"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, log_path.read_text()[-4000:]
        yield kube
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        text = log_path.read_text()
        # The API server answers "403 Forbidden ... is forbidden: User ... cannot ..." to RBAC denials.
        forbidden = [line for line in text.splitlines() if "forbidden" in line.lower()]
        print("---- operator log tail ----\n" + text[-6000:])
        assert not forbidden, "the operator hit RBAC denials:\n" + "\n".join(forbidden[:10])


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    kubeconfig, kube = cluster
    name = f"{NS_PREFIX}{uuid.uuid4().hex[:8]}"
    kube.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}})
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")
    # Without a kubelet nothing releases kubernetes.io/pvc-protection; drop it so the namespace can go.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and kube.get("v1", "Namespace", None, name):
        for pvc in kube.list("v1", "PersistentVolumeClaim", name):
            if pvc["metadata"].get("finalizers"):
                try:
                    merge(kube, PVC, name, pvc["metadata"]["name"], {"metadata": {"finalizers": None}})
                except KubeError:
                    pass  # gone meanwhile
        time.sleep(0.5)


def dlm(name: str, namespace: str, **spec: Any) -> dict:
    body = {"apiVersion": DLM[0], "kind": DLM[1], "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"uri": "hf://GSAI-ML/LLaDA-8B-Instruct", "credentialsSecretRef": {"name": "hf"}}}}
    body["spec"].update(copy.deepcopy(spec))
    return body


def get(kube: Kube, kind: tuple[str, str], ns: str, name: str) -> dict | None:
    return kube.get(kind[0], kind[1], ns, name)


def cond(obj: dict | None, type_: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def merge(kube: Kube, kind: tuple[str, str], ns: str, name: str, patch: dict, status: bool = False) -> dict:
    from dllm_operator.kube import resource_path

    return kube.request("PATCH", resource_path(kind[0], kind[1], ns, name, "status" if status else None),
                        body=patch, content_type="application/merge-patch+json")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def job_started(kube: Kube, ns: str, name: str) -> None:
    """Wait until the real Job controller has made the Job's pod and written its first status.

    Its status write replaces the whole status (Get, set, UpdateStatus), so a condition patched in
    before it lands is silently dropped: the Job reads Running again, and the operator keeps waiting
    for a download that already "finished". After it, the controller leaves the Job's status alone
    (nothing changes its pod: no kubelet) and a finished Job is never synced again.
    """
    eventually(lambda: (((get(kube, JOB, ns, name) or {}).get("status") or {}).get("active") or 0) >= 1,
               what=f"Job {name} started by the Job controller")


def complete_job(kube: Kube, ns: str, name: str) -> None:
    """What the Job controller writes when the download pod succeeds (no kubelet here)."""
    job_started(kube, ns, name)
    t = now()
    merge(kube, JOB, ns, name, {"status": {"startTime": t, "completionTime": t, "succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "lastProbeTime": t, "lastTransitionTime": t}]}}, status=True)


def fail_job(kube: Kube, ns: str, name: str) -> None:
    job_started(kube, ns, name)
    t = now()
    merge(kube, JOB, ns, name, {"status": {"startTime": t, "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit", "lastProbeTime": t, "lastTransitionTime": t}]}},
        status=True)


def ready_isvc(kube: Kube, ns: str, name: str, url: str) -> None:
    """What KServe's controller writes once the predictor is up."""
    t = now()
    merge(kube, ISVC, ns, name, {"status": {"url": url, "conditions": [
        {"type": "PredictorReady", "status": "True", "lastTransitionTime": t},
        {"type": "Ready", "status": "True", "lastTransitionTime": t}],
        "modelStatus": {"states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                        "transitionStatus": "UpToDate"}}}, status=True)


def gone(kube: Kube, kind: tuple[str, str], ns: str, name: str) -> bool:
    """Deleted, or deletion started: a PVC keeps the kubernetes.io/pvc-protection finalizer until its
    controller (not run here: no kubelet, no pods using it) releases it."""
    obj = get(kube, kind, ns, name)
    return obj is None or bool(obj["metadata"].get("deletionTimestamp"))


def job_name(kube: Kube, ns: str, name: str) -> str:
    return eventually(lambda: ((get(kube, DLM, ns, name) or {}).get("status") or {}).get("download", {}).get("jobName"),
                      what="status.download.jobName")


def test_lifecycle_download_deploy_ready_update_repair_rollout_delete(operator, namespace):
    kube, ns = operator, namespace
    kube.create(dlm("llada", ns, decoding={"algorithm": "fast_dllm", "threshold": 0.9, "blockLength": 32},
                    serving={"external": True}))
    created = get(kube, DLM, ns, "llada")
    uid = created["metadata"]["uid"]
    assert created["spec"]["serving"]["deploymentMode"] == "Auto"  # schema default applied at admission

    # 1. PVC + download Job, owned by the DiffusionLM; nothing is served yet.
    pvc = eventually(lambda: get(kube, PVC, ns, "llada-model-cache"), what="PVC")
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == uid
    job = job_name(kube, ns, "llada")
    job_obj = eventually(lambda: get(kube, JOB, ns, job), what="Job")
    assert job_obj["metadata"]["ownerReferences"][0]["controller"] is True
    args = job_obj["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--repo-id") + 1] == "GSAI-ML/LLaDA-8B-Instruct"
    st = eventually(lambda: get(kube, DLM, ns, "llada")["status"].get("phase") == "Downloading"
                    and get(kube, DLM, ns, "llada")["status"], what="phase Downloading")
    assert cond({"status": st}, "CacheReady")["status"] == "False"
    assert get(kube, ISVC, ns, "llada") is None

    # 2. Download completes -> ServingRuntime + InferenceService on the cached path.
    complete_job(kube, ns, job)
    isvc = eventually(lambda: get(kube, ISVC, ns, "llada"), what="InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == "pvc://llada-model-cache/models/GSAI-ML/LLaDA-8B-Instruct/main"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"  # Auto, new KServe
    assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "exposed"
    assert "--threshold=0.9" in model["args"]
    sr = eventually(lambda: get(kube, SR, ns, "llada"), what="ServingRuntime")
    assert sr["spec"]["containers"][0]["image"] == "registry.test/dllm-serve:test"
    eventually(lambda: get(kube, DLM, ns, "llada")["status"]["phase"] == "Deploying", what="phase Deploying")

    # 3. KServe reports Ready -> DiffusionLM Ready with the URL, mirrored model state.
    ready_isvc(kube, ns, "llada", "https://llada-" + ns + ".apps.example.com")
    st = eventually(lambda: (s := get(kube, DLM, ns, "llada")["status"])["phase"] == "Ready" and s,
                    what="phase Ready")
    assert cond({"status": st}, "Ready")["status"] == "True"
    assert st["url"] == "https://llada-" + ns + ".apps.example.com"
    assert st["inferenceService"]["activeModelState"] == "Loaded"
    assert st["observedGeneration"] == get(kube, DLM, ns, "llada")["metadata"]["generation"]

    # 4. Spec change rolls into the children.
    merge(kube, DLM, ns, "llada", {"spec": {"serving": {"maxReplicas": 3}, "decoding": {"threshold": 0.8}}})
    eventually(lambda: (p := get(kube, ISVC, ns, "llada")["spec"]["predictor"])["maxReplicas"] == 3
               and "--threshold=0.8" in p["model"]["args"], what="InferenceService updated")

    # 5. A child deleted or edited by hand is restored.
    old_uid = get(kube, ISVC, ns, "llada")["metadata"]["uid"]
    kube.delete(*ISVC, ns, "llada")
    eventually(lambda: (i := get(kube, ISVC, ns, "llada")) and i["metadata"]["uid"] != old_uid,
               what="InferenceService re-created")
    merge(kube, SR, ns, "llada", {"spec": {"containers": [{"name": "kserve-container", "image": "evil:latest"}]}})
    eventually(lambda: get(kube, SR, ns, "llada")["spec"]["containers"][0]["image"] == "registry.test/dllm-serve:test",
               what="ServingRuntime image restored")

    # 6. New revision: downloaded next to the old one while the old one keeps serving, then switched.
    ready_isvc(kube, ns, "llada", "https://llada.example.com")
    merge(kube, DLM, ns, "llada", {"spec": {"model": {"revision": "v2"}}})
    new_job = eventually(lambda: (j := job_name(kube, ns, "llada")) != job and j, what="new download Job")
    eventually(lambda: get(kube, JOB, ns, new_job), what="new Job object")
    st = eventually(lambda: (s := get(kube, DLM, ns, "llada")["status"])["download"]["revision"] == "v2" and s)
    assert get(kube, ISVC, ns, "llada")["spec"]["predictor"]["model"]["storageUri"].endswith("/main")
    eventually(lambda: cond(get(kube, DLM, ns, "llada"), "Ready").get("reason") == "RollingOut", what="RollingOut")
    # deleted by hand mid-rollout: back at once, on the revision that is still being served
    rolling_uid = get(kube, ISVC, ns, "llada")["metadata"]["uid"]
    kube.delete(*ISVC, ns, "llada")
    isvc = eventually(lambda: (i := get(kube, ISVC, ns, "llada")) and i["metadata"]["uid"] != rolling_uid and i,
                      what="InferenceService re-created during the rollout")
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("/main")
    complete_job(kube, ns, new_job)
    eventually(lambda: get(kube, ISVC, ns, "llada")["spec"]["predictor"]["model"]["storageUri"].endswith("/v2"),
               what="storageUri switched to v2")

    # 7. Deleting the DiffusionLM garbage-collects every child (kube-controller-manager's GC).
    kube.delete(*DLM, ns, "llada")
    for kind, name in ((ISVC, "llada"), (SR, "llada"), (JOB, job), (JOB, new_job), (PVC, "llada-model-cache")):
        eventually(lambda: gone(kube, kind, ns, name), what=f"{kind[1]} {name} garbage-collected")


def test_invalid_specs_are_rejected_or_reported(operator, namespace):
    kube, ns = operator, namespace
    # The schema rejects at admission.
    for bad in (dlm("bad1", ns, decoding={"cache": "full"}), dlm("bad2", ns, serving={"maxReplicas": 0}),
                {**dlm("bad3", ns), "spec": {"model": {"uri": "http://example.com/model"}}}):
        with pytest.raises(KubeError) as info:
            kube.create(bad)
        assert info.value.status == 422, info.value
    # What the schema cannot express becomes a condition, without children and without crash-looping.
    kube.create(dlm("steps", ns, decoding={"algorithm": "llada", "maxTokens": 256, "blockLength": 32, "steps": 100}))
    st = eventually(lambda: (s := (get(kube, DLM, ns, "steps").get("status") or {})).get("phase") == "Failed" and s,
                    what="phase Failed")
    ready = cond({"status": st}, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "decoding.steps" in ready["message"]
    assert get(kube, PVC, ns, "steps-model-cache") is None
    # Fixing the spec reconciles normally.
    merge(kube, DLM, ns, "steps", {"spec": {"decoding": {"steps": 64}}})
    eventually(lambda: get(kube, PVC, ns, "steps-model-cache"), what="PVC after the fix")
    eventually(lambda: cond(get(kube, DLM, ns, "steps"), "Ready").get("reason") != "InvalidSpec")


def test_download_failure_reason_retry_with_backoff_then_failed(operator, namespace):
    kube, ns = operator, namespace
    kube.create(dlm("gated", ns, cache={"download": {"maxAttempts": 2}}))
    job = job_name(kube, ns, "gated")
    first_uid = eventually(lambda: get(kube, JOB, ns, job), what="Job")["metadata"]["uid"]
    # The download pod exited 3 with its JSON error line as termination message (as a kubelet reports it).
    pod = kube.create({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "gated-dl-pod", "namespace": ns, "labels": {"job-name": job}},
                       "spec": {"restartPolicy": "Never", "containers": [{"name": "download", "image": "x"}]}})
    t = now()
    message = json.dumps({"event": "error", "reason": "Unauthorized", "message": "401: token lacks access"})
    merge(kube, ("v1", "Pod"), ns, pod["metadata"]["name"], {"status": {"phase": "Failed", "containerStatuses": [
        {"name": "download", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
         "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": message, "finishedAt": t,
                                  "startedAt": t}}}]}}, status=True)
    fail_job(kube, ns, job)
    st = eventually(lambda: (s := get(kube, DLM, ns, "gated")["status"])["download"].get("lastFailure") and s,
                    what="lastFailure")
    assert st["download"]["lastFailure"]["reason"] == "Unauthorized"
    assert "401" in st["download"]["lastFailure"]["message"]
    # Retried: the failed Job is replaced after the backoff; attempts counts it.
    eventually(lambda: (j := get(kube, JOB, ns, job)) and j["metadata"]["uid"] != first_uid, what="Job re-created")
    eventually(lambda: get(kube, DLM, ns, "gated")["status"]["download"]["attempts"] == 2, what="attempts == 2")
    assert get(kube, JOB, ns, job)["metadata"]["annotations"]["serving.dllm.io/attempt"] == "2"
    kube.delete("v1", "Pod", ns, "gated-dl-pod")
    fail_job(kube, ns, job)
    st = eventually(lambda: (s := get(kube, DLM, ns, "gated")["status"])["phase"] == "Failed" and s,
                    what="phase Failed after the last attempt")
    assert "no attempts left" in cond({"status": st}, "CacheReady")["message"]


def test_retain_on_delete_keeps_the_cache(operator, namespace):
    kube, ns = operator, namespace
    kube.create(dlm("keep", ns, cache={"retainOnDelete": True}))
    pvc = eventually(lambda: get(kube, PVC, ns, "keep-model-cache"), what="PVC")
    assert "ownerReferences" not in pvc["metadata"]
    job = job_name(kube, ns, "keep")
    eventually(lambda: get(kube, JOB, ns, job), what="Job")
    kube.delete(*DLM, ns, "keep")
    eventually(lambda: get(kube, JOB, ns, job) is None, what="Job garbage-collected")
    time.sleep(2)
    kept = get(kube, PVC, ns, "keep-model-cache")
    assert kept is not None and not kept["metadata"].get("deletionTimestamp")


def test_storage_initializer_uri_existing_runtime_and_suspend(operator, namespace):
    kube, ns = operator, namespace
    kube.create(dlm("s3", ns, model={"uri": "s3://models/llada"}, runtime={"servingRuntimeName": "shared-dllm"},
                    serving={"deploymentMode": "RawDeployment"}))
    isvc = eventually(lambda: get(kube, ISVC, ns, "s3"), what="InferenceService without download")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models/llada"
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "shared-dllm"
    # Explicit RawDeployment on a KServe that speaks the new vocabulary is written as Standard.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert get(kube, SR, ns, "s3") is None and get(kube, PVC, ns, "s3-model-cache") is None
    eventually(lambda: cond(get(kube, DLM, ns, "s3"), "RuntimeReady").get("reason") == "RuntimeNotFound")
    merge(kube, DLM, ns, "s3", {"spec": {"suspend": True}})
    eventually(lambda: get(kube, ISVC, ns, "s3")["metadata"]["annotations"]["serving.kserve.io/stop"] == "true",
               what="stop annotation")
    eventually(lambda: get(kube, DLM, ns, "s3")["status"]["phase"] == "Suspended", what="phase Suspended")


def test_plain_install_manifests_and_samples_are_accepted_by_the_api_server(cluster):
    kubeconfig, _ = cluster
    for path in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "deployment.yaml"):
        kubectl("apply", "--dry-run=server", "-f", str(ROOT / "manifests" / "operator" / path), kubeconfig=kubeconfig)
    for sample in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(sample), kubeconfig=kubeconfig)
