"""OpenShift restricted-v2 safe security contexts: non-root, any UID, no escalation, no capabilities."""

from __future__ import annotations

from typing import Any


def pod_security_context() -> dict[str, Any]:
    # No runAsUser/fsGroup: OpenShift assigns them from the namespace range (restricted-v2).
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
