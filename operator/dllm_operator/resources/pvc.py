"""The managed model-cache PersistentVolumeClaim."""

from __future__ import annotations

from typing import Any

from ..api import DiffusionLM
from .meta import bounded_name, object_meta


def cache_claim_name(dlm: DiffusionLM) -> str | None:
    """The claim the download Job writes into (None when KServe's storage initializer fetches the model)."""
    if dlm.cache.mode == "Existing":
        return dlm.cache.existing_claim_name
    if dlm.cache.mode == "Managed":
        return bounded_name(dlm.name, "model-cache")
    return None


def build_pvc(dlm: DiffusionLM) -> dict[str, Any] | None:
    """The PVC for cache.mode Managed; without ownerReference when retainOnDelete (kept after deletion)."""
    if dlm.cache.mode != "Managed":
        return None
    spec: dict[str, Any] = {
        "accessModes": list(dlm.cache.access_modes),
        "resources": {"requests": {"storage": dlm.cache.size}},
        "volumeMode": "Filesystem",
    }
    if dlm.cache.storage_class_name:
        spec["storageClassName"] = dlm.cache.storage_class_name
    annotations = {"serving.dllm.io/retain-on-delete": str(dlm.cache.retain_on_delete).lower()}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_meta(dlm, cache_claim_name(dlm), "model-cache", owned=not dlm.cache.retain_on_delete,
                                annotations=annotations),
        "spec": spec,
    }
