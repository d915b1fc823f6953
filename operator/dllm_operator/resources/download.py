"""The download Job: `dllm-serve download` from the runtime image into the cache claim.

One Job per (repository, revision): its name carries a hash of both, so a new revision gets a new Job and
a new directory next to the old one, and the InferenceService switches `storageUri` only once the new
download completes (the old revision keeps serving meanwhile). Jobs are immutable, so the operator only
creates them, and deletes a failed one to retry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..api import DiffusionLM
from .meta import bounded_name, object_meta, short_hash
from .pvc import cache_claim_name
from .security import container_security_context, pod_security_context

CACHE_MOUNT = "/cache"
TERMINATION_LOG = "/dev/termination-log"


@dataclass(frozen=True)
class DownloadTarget:
    job_name: str
    claim_name: str
    #: directory inside the claim (no leading slash)
    path: str
    revision: str

    @property
    def storage_uri(self) -> str:
        return f"pvc://{self.claim_name}/{self.path}"


def _safe_segment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "--", text)


def download_target(dlm: DiffusionLM) -> DownloadTarget | None:
    """Where this spec's model lands in the cache (None when the operator does not download)."""
    claim = cache_claim_name(dlm)
    repo = dlm.model.hf_repo
    if not dlm.cache.downloads or claim is None or repo is None:
        return None
    org, name = repo.split("/", 1)
    path = f"models/{_safe_segment(org)}/{_safe_segment(name)}/{_safe_segment(dlm.model.revision)}"
    job = bounded_name(dlm.name, "dl-" + short_hash(dlm.model.uri, dlm.model.revision, claim))
    return DownloadTarget(job_name=job, claim_name=claim, path=path, revision=dlm.model.revision)


ATTEMPT_ANNOTATION = "serving.dllm.io/attempt"


def build_download_job(dlm: DiffusionLM, attempt: int = 1) -> dict[str, Any] | None:
    """The Job for this spec's revision; `attempt` (1-based) is recorded on it so the retry count survives
    a lost status write."""
    target = download_target(dlm)
    if target is None:
        return None
    env: list[dict[str, Any]] = [
        # Partial files live on the claim, so a retried pod resumes instead of starting over.
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/.hf-home"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if dlm.model.credentials_secret:
        env.append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": dlm.model.credentials_secret, "key": dlm.model.credentials_key}},
        })
    container: dict[str, Any] = {
        "name": "download",
        "image": dlm.runtime.image,
        "command": ["dllm-serve", "download"],
        "args": [
            "--repo-id", dlm.model.hf_repo,
            "--revision", target.revision,
            "--output", f"{CACHE_MOUNT}/{target.path}",
            "--termination-log", TERMINATION_LOG,
        ],
        "env": env,
        "terminationMessagePath": TERMINATION_LOG,
        # The download command writes its JSON error there; the log tail is the fallback for crashes.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "model-cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if dlm.runtime.image_pull_policy:
        container["imagePullPolicy"] = dlm.runtime.image_pull_policy
    labels = {"serving.dllm.io/download": target.job_name}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": target.claim_name}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if dlm.scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(dlm.scheduling.node_selector)
    if dlm.scheduling.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in dlm.scheduling.tolerations]
    annotations = {
        "serving.dllm.io/model-uri": dlm.model.uri,
        "serving.dllm.io/revision": target.revision,
        "serving.dllm.io/storage-uri": target.storage_uri,
        ATTEMPT_ANNOTATION: str(attempt),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(dlm, target.job_name, "download", labels=labels, annotations=annotations),
        "spec": {
            "backoffLimit": dlm.cache.download.backoff_limit,
            "activeDeadlineSeconds": dlm.cache.download.active_deadline_seconds,
            "template": {
                "metadata": {"labels": {**object_meta(dlm, target.job_name, "download", labels=labels)["labels"]}},
                "spec": pod_spec,
            },
        },
    }
