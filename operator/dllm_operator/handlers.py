"""kopf wiring: every trigger runs the same level-based reconcile pass and writes the status it returns.

Children carry controller ownerReferences and the garbage collector removes them with the DiffusionLM
(the cache PVC stays when retainOnDelete). kopf puts its finalizer on each DiffusionLM only to stop the
resync timer cleanly; it is removed as soon as the object is deleted. All status writes happen in
`Reconciler.sync`, under a per-object lock, from a fresh read.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import GROUP, PLURAL, VERSION
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


def _sync(namespace: str, name: str) -> None:
    try:
        reconciler().sync(namespace, name)
    except UnreachableError as exc:
        raise kopf.TemporaryError(f"API server unavailable, retrying: {exc}", delay=10) from exc


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(namespace: str, name: str, **_: Any) -> None:
    _sync(namespace, name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
def resync(namespace: str, name: str, **_: Any) -> None:
    """Drift repair and status refresh (children deleted or edited by hand, KServe/Job progress)."""
    _sync(namespace, name)


@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def on_child_event(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """React to KServe readiness and Job completion at once instead of at the next resync."""
    owner = (body.metadata.labels or {}).get(LABEL_OWNER)
    namespace = body.metadata.namespace
    if not owner or not namespace:
        return
    try:
        reconciler().sync(namespace, owner)
    except (UnreachableError, KubeError) as exc:
        # The resync timer repairs whatever this missed; no retries from an event handler.
        logger.warning("reconcile of %s/%s after a child event failed: %s", namespace, owner, exc)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(namespace: str, name: str, **_: Any) -> None:
    """Nothing to clean up (ownerReferences do it); only forget per-object state."""
    reconciler().forget(namespace, name)
