"""The ServingRuntime: dllm-serve's container, probes and metrics annotations (KServe + RHOAI conventions).

Rendered per DiffusionLM with the InferenceService's name (the RHOAI dashboard pairs them by name).
Per-model settings (decoding defaults, served name) travel as the InferenceService's model args, which
KServe appends to the runtime's, so a user-named existing runtime gets them too.
"""

from __future__ import annotations

import math
from typing import Any

from ..api import DECODING_FLAGS, DiffusionLM
from ..config import OperatorSettings
from .meta import object_meta
from .security import container_security_context

MODEL_FORMAT = "dllm"
PORT = 8080
MODEL_DIR = "/mnt/models"
CACHE_DIR = "/var/cache/dllm"


def readiness_path(dlm: DiffusionLM) -> str:
    return f"/v1/models/{dlm.model.served_model_name}"


def probes(dlm: DiffusionLM, settings: OperatorSettings) -> dict[str, Any]:
    """Readiness on the model's readiness path; a startup budget long enough to load an 8B model."""
    period = 10
    http = {"path": readiness_path(dlm), "port": PORT, "scheme": "HTTP"}
    return {
        "startupProbe": {"httpGet": http, "periodSeconds": period, "timeoutSeconds": 5,
                         "failureThreshold": max(1, math.ceil(settings.startup_budget_seconds / period))},
        "readinessProbe": {"httpGet": http, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT, "scheme": "HTTP"}, "periodSeconds": 30,
                          "timeoutSeconds": 10, "failureThreshold": 3},
    }


def runtime_args(dlm: DiffusionLM) -> list[str]:
    """Per-model dllm-serve flags (InferenceService model args): served name, engine and decoding defaults."""
    args = [f"--served-model-name={dlm.model.served_model_name}"]
    if dlm.runtime.dtype:
        args.append(f"--dtype={dlm.runtime.dtype}")
    if dlm.runtime.max_model_len:
        args.append(f"--max-model-len={dlm.runtime.max_model_len}")
    if dlm.runtime.max_num_seqs:
        args.append(f"--max-num-seqs={dlm.runtime.max_num_seqs}")
    for key, value in dlm.decoding.items():
        args.append(f"{DECODING_FLAGS[key][0]}={value}")
    return args + list(dlm.runtime.args)


def build_serving_runtime(dlm: DiffusionLM, settings: OperatorSettings) -> dict[str, Any] | None:
    if dlm.runtime.serving_runtime_name:
        return None
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": dlm.runtime.image,
        "command": ["dllm-serve", "serve"],
        "args": [f"--model={MODEL_DIR}", f"--port={PORT}"],
        "ports": [{"name": "http1", "containerPort": PORT, "protocol": "TCP"}],
        "env": [
            # Writable caches in volumes: the image's filesystem may be read-only and the UID arbitrary.
            {"name": "HOME", "value": CACHE_DIR},
            {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
            {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/inductor"},
        ],
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        **probes(dlm, settings),
    }
    if dlm.runtime.image_pull_policy:
        container["imagePullPolicy"] = dlm.runtime.image_pull_policy
    annotations = {
        "openshift.io/display-name": f"dllm-serve {dlm.serving.display_name}",
        "opendatahub.io/recommended-accelerators": f'["{dlm.resources.gpu_resource_name}"]',
        "opendatahub.io/apiProtocol": "REST",
        "opendatahub.io/runtime-version": "v0.1.0",
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": object_meta(dlm, dlm.name, "serving-runtime", labels={"opendatahub.io/dashboard": "true"},
                                annotations=annotations),
        "spec": {
            # odh-model-controller creates the metrics Service/ServiceMonitor only when these are set.
            "annotations": {"prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"},
            "multiModel": False,
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "containers": [container],
            "volumes": [
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": dlm.resources.shared_memory_size}},
                {"name": "cache", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }
