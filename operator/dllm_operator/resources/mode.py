"""deploymentMode: what to write into `serving.kserve.io/deploymentMode`, surviving KServe's rename.

KServe renamed RawDeployment -> Standard and Serverless -> Knative; new releases still accept the old
names (normalising them), old releases know only the old ones. So the spelling follows the installed
KServe's own vocabulary, read from the `deploy.defaultDeploymentMode` of its `inferenceservice-config`
ConfigMap, and the legacy spelling (valid everywhere) is used when that cannot be read.
"""

from __future__ import annotations

import json
from typing import Any

RAW, KNATIVE = "raw", "knative"
_FAMILY = {"Standard": RAW, "RawDeployment": RAW, "Knative": KNATIVE, "Serverless": KNATIVE}
_NEW_SPELLING = {RAW: "Standard", KNATIVE: "Knative"}
_LEGACY_SPELLING = {RAW: "RawDeployment", KNATIVE: "Serverless"}


def kserve_default_mode(configmap: dict[str, Any] | None) -> str | None:
    """`deploy.defaultDeploymentMode` of KServe's inferenceservice-config, or None when absent/garbled."""
    if not configmap:
        return None
    raw = (configmap.get("data") or {}).get("deploy")
    try:
        value = json.loads(raw).get("defaultDeploymentMode") if raw else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def resolve_deployment_mode(requested: str, kserve_default: str | None) -> str:
    """The annotation value for `requested` (Auto|Standard|RawDeployment|Knative|Serverless).

    Auto follows the installed KServe's default mode (raw/Standard when unknown: no Knative needed, and
    what RHOAI recommends for LLMs). The spelling is the new one only when KServe itself uses it.
    """
    if requested == "Auto":
        family = _FAMILY.get(kserve_default or "", RAW)
    elif requested in _FAMILY:
        family = _FAMILY[requested]
    else:
        raise ValueError(f"serving.deploymentMode: unknown mode {requested!r}")
    new_vocabulary = kserve_default in _NEW_SPELLING.values()
    return (_NEW_SPELLING if new_vocabulary else _LEGACY_SPELLING)[family]


def is_knative(mode: str) -> bool:
    return _FAMILY.get(mode) == KNATIVE
