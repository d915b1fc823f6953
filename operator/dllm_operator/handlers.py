"""kopf wiring: every trigger runs the same level-based reconcile pass and writes the status it returns.

No deletion handler and therefore no finalizer: children carry controller ownerReferences and the
garbage collector removes them with the DiffusionLM (the cache PVC stays when retainOnDelete).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import GROUP, PLURAL, VERSION
from .config import OperatorSettings
from .kube import Kube
from .reconcile import Reconciler, UnreachableError

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
