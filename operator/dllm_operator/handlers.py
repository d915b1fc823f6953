"""kopf wiring: every trigger runs the same level-based reconcile pass and writes the status it returns.

No deletion handler and therefore no finalizer: children carry controller ownerReferences and the
garbage collector removes them with the DiffusionLM (the cache PVC stays when retainOnDelete).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import API_VERSION, GROUP, KIND, PLURAL, VERSION
from .config import OperatorSettings
from .kube import Kube, KubeError
from .reconcile import Reconciler, UnreachableError
from .resources.meta import LABEL_MANAGED_BY, LABEL_OWNER, MANAGED_BY

SETTINGS = OperatorSettings.from_env()
_reconciler: Reconciler | None = None


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        _reconciler = Reconciler(Kube(), SETTINGS)
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # Handler bookkeeping in annotations under our own prefix keeps .status for the user-facing fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="serving.dllm.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="serving.dllm.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    logger.info("dllm-operator settings: %s", SETTINGS)


def _write(patch: kopf.Patch, body: kopf.Body) -> None:
    try:
        status = reconciler().reconcile(dict(body))
    except UnreachableError as exc:
        raise kopf.TemporaryError(f"API server unavailable, retrying: {exc}", delay=10) from exc
    patch.status.update(status)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _write(patch, body)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
def resync(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Drift repair and status refresh (children deleted or edited by hand, KServe/Job progress)."""
    _write(patch, body)


@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_child_event(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """React to KServe readiness and Job completion at once instead of at the next resync.

    The owner is re-read and reconciled in full (the same pass as every other trigger); its status is
    written directly because kopf's patch here would go to the child.
    """
    owner = (body.metadata.labels or {}).get(LABEL_OWNER)
    namespace = body.metadata.namespace
    if not owner or not namespace:
        return
    rec = reconciler()
    try:
        parent = rec.kube.get(API_VERSION, KIND, namespace, owner)
        if parent is None:
            return  # being garbage-collected with its owner
        status = rec.reconcile(parent)
        rec.kube.patch_status(API_VERSION, KIND, namespace, owner, status)
    except (UnreachableError, KubeError) as exc:
        # The resync timer repairs whatever this missed; no retries from an event handler.
        logger.warning("reconcile of %s/%s after a child event failed: %s", namespace, owner, exc)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(namespace: str, name: str, **_: Any) -> None:
    """Nothing to clean up (ownerReferences do it); only forget per-object state. No finalizer."""
    reconciler().forget(namespace, name)
