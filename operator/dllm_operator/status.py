"""Status from observed children: conditions (metav1.Condition shape), phase, URL. Pure functions.

Readiness is mirrored from the InferenceService's own `Ready` condition, never assumed from having
applied it. `lastTransitionTime` only moves when a condition's status changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .download_state import PERMANENT_REASONS, DownloadFailure

CONDITION_TYPES = ("CacheReady", "RuntimeReady", "InferenceServiceReady", "Ready")
PHASES = ("Pending", "Downloading", "Deploying", "Ready", "Degraded", "Suspended", "Failed")


def condition(type_: str, ok: bool | None, reason: str, message: str | None, generation: int) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    # Never an empty message: JSON merge patches on Kubernetes 1.20 turn "" into null, which the schema
    # rejects; and an empty message tells the user nothing.
    return {"type": type_, "status": status, "reason": reason or status, "message": (message or reason or status)[:1024],
            "observedGeneration": generation}


def merge_conditions(previous: list[dict] | None, current: list[dict], now: str) -> list[dict]:
    """`current` with lastTransitionTime carried over from `previous` where the status did not change."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for cond in current:
        old = before.get(cond["type"])
        stamp = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        out.append({**cond, "lastTransitionTime": stamp or now})
    return out


@dataclass
class Observation:
    """What the reconciler saw of the children this pass."""

    generation: int
    suspended: bool = False
    #: None when the spec is valid
    invalid: str | None = None
    cache_mode: str = "None"
    #: state of the current revision's download Job (download_state.job_state), or None without download
    job_state: str | None = None
    job_name: str | None = None
    download_failure: DownloadFailure | None = None
    download_gave_up: bool = False
    download_retry_in_s: float | None = None
    progress: dict[str, int] | None = None
    pvc_phase: str | None = None
    runtime_name: str = ""
    runtime_found: bool = True
    runtime_error: str | None = None
    isvc: dict | None = None
    #: the storageUri the InferenceService serves and the one the spec asks for
    serving_uri: str | None = None
    desired_uri: str | None = None
    apply_errors: list[str] = field(default_factory=list)


def _isvc_ready(isvc: dict | None) -> tuple[bool | None, str, str]:
    if isvc is None:
        return False, "NotCreated", "the InferenceService does not exist yet"
    for cond in (isvc.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            ok = {"True": True, "False": False}.get(cond.get("status"))
            reason = cond.get("reason") or ("Ready" if ok else "NotReady")
            default = "KServe reports the InferenceService Ready" if ok else "KServe reports it not Ready"
            return ok, reason, cond.get("message") or default
    return None, "Reconciling", "KServe has not reported the InferenceService's readiness yet"


def isvc_url(isvc: dict | None) -> str | None:
    status = (isvc or {}).get("status") or {}
    return status.get("url") or ((status.get("address") or {}).get("url")) or None


def isvc_mirror(isvc: dict | None) -> dict[str, Any]:
    """The InferenceService's model state, mirrored into our status."""
    if isvc is None:
        return {}
    status = isvc.get("status") or {}
    model = status.get("modelStatus") or {}
    states = model.get("states") or {}
    failure = model.get("lastFailureInfo") or {}
    ready, _, _ = _isvc_ready(isvc)
    out = {
        "name": isvc["metadata"]["name"],
        "ready": {True: "True", False: "False", None: "Unknown"}[ready],
        "activeModelState": states.get("activeModelState"),
        "targetModelState": states.get("targetModelState"),
        "transitionStatus": model.get("transitionStatus"),
        "failureReason": failure.get("reason"),
        "failureMessage": failure.get("message"),
    }
    return {k: v for k, v in out.items() if v not in (None, "")}


def _cache_condition(obs: Observation) -> tuple[bool, str, str]:
    if obs.cache_mode == "None":
        return True, "NotRequired", "KServe's storage initializer fetches the model from its URI"
    state = obs.job_state
    if state == "Complete":
        return True, "Downloaded", f"the model is in the cache ({obs.desired_uri})"
    if obs.download_failure is not None and (state in ("Failed", "Absent") or obs.download_gave_up):
        failure = obs.download_failure
        hint = " (check the credentials Secret / repository name)" if failure.reason in PERMANENT_REASONS else ""
        if obs.download_gave_up:
            return False, f"Download{failure.reason}", f"download failed, no attempts left: {failure.message}{hint}"
        retry = f"; retrying in {obs.download_retry_in_s:.0f}s" if obs.download_retry_in_s else "; retrying"
        return False, f"Download{failure.reason}", f"{failure.message}{hint}{retry}"
    if state == "Running":
        p = obs.progress or {}
        if p.get("bytesTotal"):
            pct = 100.0 * p.get("bytesDone", 0) / p["bytesTotal"]
            return False, "Downloading", f"{pct:.1f}% of {p['bytesTotal']} bytes ({obs.job_name})"
        return False, "Downloading", f"download Job {obs.job_name} is running"
    return False, "DownloadPending", f"download Job {obs.job_name or ''} is waiting to start".replace("  ", " ")


def compute_status(obs: Observation, previous: dict | None, now: str) -> dict[str, Any]:
    """The full `.status` for this observation (conditions merged with the previous ones)."""
    previous = previous or {}
    gen = obs.generation
    if obs.invalid is not None:
        conds = [
            condition("CacheReady", None, "InvalidSpec", "not reconciled: the spec is invalid", gen),
            condition("RuntimeReady", None, "InvalidSpec", "not reconciled: the spec is invalid", gen),
            condition("InferenceServiceReady", None, "InvalidSpec", "not reconciled: the spec is invalid", gen),
            condition("Ready", False, "InvalidSpec", obs.invalid, gen),
        ]
        return {"phase": "Failed", "observedGeneration": gen,
                "conditions": merge_conditions(previous.get("conditions"), conds, now)}

    cache_ok, cache_reason, cache_msg = _cache_condition(obs)
    if obs.runtime_error:
        rt = (False, "ApplyFailed", obs.runtime_error)
    elif obs.runtime_found:
        rt = (True, "Available", f"ServingRuntime {obs.runtime_name} is available")
    else:
        rt = (False, "RuntimeNotFound", f"no ServingRuntime or ClusterServingRuntime named {obs.runtime_name}")
    isvc_ok, isvc_reason, isvc_msg = _isvc_ready(obs.isvc)
    if obs.isvc is None and not cache_ok:
        isvc_reason, isvc_msg = "WaitingForCache", "the InferenceService is created once the model is downloaded"
    rolling = bool(obs.isvc and obs.serving_uri and obs.desired_uri and obs.serving_uri != obs.desired_uri)

    if obs.suspended:
        ready = (False, "Suspended", "spec.suspend is true: scaled to zero, the cache is kept")
    elif obs.apply_errors:
        ready = (False, "ApplyFailed", "; ".join(obs.apply_errors))
    elif isvc_ok and rt[0] and not rolling:
        ready = (True, "Ready", "the model is served")
    elif isvc_ok and rolling:
        ready = (True, "RollingOut", f"serving {obs.serving_uri} while {obs.desired_uri} is prepared")
    elif not cache_ok and obs.isvc is None:
        ready = (False, cache_reason, cache_msg)
    elif not rt[0]:
        ready = (False, rt[1], rt[2])
    else:
        ready = (False, isvc_reason, isvc_msg or "waiting for the InferenceService to become ready")

    conds = [
        condition("CacheReady", cache_ok, cache_reason, cache_msg, gen),
        condition("RuntimeReady", rt[0], rt[1], rt[2], gen),
        condition("InferenceServiceReady", isvc_ok, isvc_reason, isvc_msg, gen),
        condition("Ready", ready[0], ready[1], ready[2], gen),
    ]
    status: dict[str, Any] = {
        "phase": _phase(obs, cache_ok, isvc_ok, rt[0], bool(ready[0]), rolling),
        "observedGeneration": gen,
        "conditions": merge_conditions(previous.get("conditions"), conds, now),
        "url": isvc_url(obs.isvc) if not obs.suspended else None,
        "storageUri": obs.serving_uri,
        "inferenceService": isvc_mirror(obs.isvc) or None,
    }
    return status


def _phase(obs: Observation, cache_ok: bool, isvc_ok: bool | None, runtime_ok: bool, ready: bool,
           rolling: bool) -> str:
    if obs.suspended:
        return "Suspended"
    mirror = isvc_mirror(obs.isvc)
    load_failed = mirror.get("activeModelState") == "FailedToLoad" or mirror.get("transitionStatus") in (
        "BlockedByFailedLoad", "InvalidSpec")
    if obs.isvc is None:
        if obs.download_gave_up:
            return "Failed"
        if obs.job_state in ("Running", "Pending", "Failed", "Absent") and obs.cache_mode != "None":
            return "Downloading"
        return "Pending"
    if ready and isvc_ok:
        degraded = (rolling and (obs.download_failure is not None or obs.download_gave_up)) or not runtime_ok \
            or bool(obs.apply_errors)
        return "Degraded" if degraded else "Ready"
    if load_failed:
        return "Failed" if not obs.serving_uri else "Degraded"
    if isvc_ok is False and _was_ready(obs):
        return "Degraded"
    return "Deploying"


def _was_ready(obs: Observation) -> bool:
    """An InferenceService that has a URL and a loaded model before has lost readiness: Degraded."""
    mirror = isvc_mirror(obs.isvc)
    return mirror.get("activeModelState") == "Loaded"
