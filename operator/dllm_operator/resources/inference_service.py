"""The InferenceService: storage, replicas, resources, scheduling and the RHOAI labels/annotations."""

from __future__ import annotations

from typing import Any

from ..api import DiffusionLM
from ..config import OperatorSettings
from .meta import object_meta
from .serving_runtime import MODEL_FORMAT, probes, runtime_args


def _resources(dlm: DiffusionLM) -> dict[str, Any]:
    requests = dict(dlm.resources.requests)
    limits = dict(dlm.resources.limits)
    if dlm.resources.gpus:
        requests[dlm.resources.gpu_resource_name] = str(dlm.resources.gpus)
        limits[dlm.resources.gpu_resource_name] = str(dlm.resources.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_inference_service(dlm: DiffusionLM, storage_uri: str, deployment_mode: str,
                            settings: OperatorSettings) -> dict[str, Any]:
    """The InferenceService serving `storage_uri` in the already resolved KServe `deployment_mode`."""
    runtime_name = dlm.runtime.serving_runtime_name or dlm.name
    model: dict[str, Any] = {
        "modelFormat": {"name": MODEL_FORMAT},
        "runtime": runtime_name,
        "storageUri": storage_uri,
        "args": runtime_args(dlm),
    }
    if dlm.runtime.env:
        model["env"] = [dict(e) for e in dlm.runtime.env]
    resources = _resources(dlm)
    if resources:
        model["resources"] = resources
    if dlm.runtime.serving_runtime_name:
        # A runtime we did not render has no probes for this model's readiness path.
        model.update(probes(dlm, settings))
    predictor: dict[str, Any] = {
        "minReplicas": dlm.serving.min_replicas,
        "maxReplicas": dlm.serving.max_replicas,
        "model": model,
    }
    if dlm.serving.timeout_seconds:
        predictor["timeout"] = dlm.serving.timeout_seconds
    if dlm.serving.service_account_name:
        predictor["serviceAccountName"] = dlm.serving.service_account_name
    sched = dlm.scheduling
    if sched.node_selector:
        predictor["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        predictor["tolerations"] = [dict(t) for t in sched.tolerations]
    if sched.affinity:
        predictor["affinity"] = dict(sched.affinity)
    if sched.runtime_class_name:
        predictor["runtimeClassName"] = sched.runtime_class_name
    if sched.priority_class_name:
        predictor["priorityClassName"] = sched.priority_class_name

    labels = {"opendatahub.io/dashboard": "true"}
    if dlm.serving.external:
        labels["networking.kserve.io/visibility"] = "exposed"
    annotations = {
        "serving.kserve.io/deploymentMode": deployment_mode,
        "openshift.io/display-name": dlm.serving.display_name,
        "security.opendatahub.io/enable-auth": str(dlm.serving.auth).lower(),
        # RHOAI's stop/start: KServe removes the pods, the object, its cache and its URL stay.
        "serving.kserve.io/stop": str(dlm.suspend).lower(),
        "serving.dllm.io/model-uri": dlm.model.uri,
        "serving.dllm.io/revision": dlm.model.revision,
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": object_meta(dlm, dlm.name, "inference-service", labels=labels, annotations=annotations),
        "spec": {"predictor": predictor},
    }
