"""Names, labels and ownerReferences shared by every child."""

from __future__ import annotations

import hashlib
from typing import Any

from .. import API_VERSION, KIND
from ..api import DiffusionLM

MANAGED_BY = "dllm-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_OWNER = "serving.dllm.io/diffusionlm"
LABEL_COMPONENT = "app.kubernetes.io/component"


def child_labels(dlm: DiffusionLM, component: str) -> dict[str, str]:
    """Labels on every child: who manages it, which DiffusionLM it belongs to, what it is."""
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_OWNER: dlm.name,
        "app.kubernetes.io/part-of": "dllm-serve",
        "app.kubernetes.io/instance": dlm.name,
        LABEL_COMPONENT: component,
    }


def owner_reference(dlm: DiffusionLM) -> dict[str, Any]:
    """Controller reference: garbage collection deletes the child with its DiffusionLM."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": dlm.name,
        "uid": dlm.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(dlm: DiffusionLM, name: str, component: str, *, owned: bool = True,
                labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": dlm.namespace,
        "labels": {**child_labels(dlm, component), **(labels or {})},
    }
    if annotations:
        meta["annotations"] = annotations
    if owned:
        meta["ownerReferences"] = [owner_reference(dlm)]
    return meta


def short_hash(*parts: str, length: int = 8) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def bounded_name(prefix: str, suffix: str, limit: int = 63) -> str:
    """`prefix-suffix` cut to a DNS label: the prefix is shortened, the (unique) suffix kept."""
    room = limit - len(suffix) - 1
    return f"{prefix[:room].rstrip('-')}-{suffix}"
