"""One level-based reconcile pass: apply every desired child, observe them, return the new status.

Called by every kopf trigger (create, update, resume, timer) with the same result for the same world:
nothing here depends on which event fired. Children are applied with server-side apply, so a deleted
child is re-created and a hand-edited field the operator owns is put back.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from . import API_VERSION, GROUP, KIND, PLURAL, api
from .config import OperatorSettings
from .download_state import (
    DownloadFailure,
    decide,
    failure_from_job,
    failure_from_pods,
    job_state,
    newest_pod_name,
    parse_progress,
)
from .kube import Kube, KubeError
from .resources import (
    build_download_job,
    build_inference_service,
    build_pvc,
    build_serving_runtime,
    download_target,
    resolve_deployment_mode,
)
from .resources.download import ATTEMPT_ANNOTATION
from .resources.mode import is_knative, kserve_default_mode
from .status import Observation, compute_status

log = logging.getLogger(__name__)
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def rfc3339(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


class UnreachableError(Exception):
    """The API server could not be reached or asked us to back off: retry the whole pass later."""


@dataclass
class KServeDefaults:
    """The installed KServe's default deployment mode, re-read at most every `ttl_s` seconds."""

    ttl_s: float
    value: str | None = None
    fetched_at: float = float("-inf")

    def get(self, kube: Kube, namespace: str) -> str | None:
        if time.monotonic() - self.fetched_at < self.ttl_s:
            return self.value
        try:
            cm = kube.get("v1", "ConfigMap", namespace, "inferenceservice-config")
        except KubeError as exc:
            if exc.retryable:
                raise
            cm = None  # 403: not allowed to read it; Auto then uses the spelling every KServe accepts
        self.value, self.fetched_at = kserve_default_mode(cm), time.monotonic()
        return self.value


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube = kube
        self.settings = settings
        self.kserve = KServeDefaults(ttl_s=max(settings.resync_seconds, 10.0))
        # One pass at a time per object: kopf's handlers and the child-event path may overlap.
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    def sync(self, namespace: str, name: str, now: dt.datetime | None = None) -> dict[str, Any] | None:
        """Read the object fresh, reconcile it and write its status, all under the object's lock.

        The single writer of `.status`: kopf's cached body can be older than a status written by an
        overlapping pass (e.g. a Job event), so nothing here trusts a body handed in from outside.
        Returns the status written, or None when the object is gone or being deleted.
        """
        with self._lock(namespace, name):
            try:
                body = self.kube.get(API_VERSION, KIND, namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return None  # garbage collection takes the children; re-applying would fight it
                status = self._reconcile(body, now or utcnow())
                self.kube.patch_status(API_VERSION, KIND, namespace, name, status)
                return status
            except KubeError as exc:
                if exc.status == 404 and exc.message.startswith(f"{PLURAL}.{GROUP}"):
                    return None  # deleted meanwhile
                if exc.retryable:
                    raise UnreachableError(str(exc)) from exc
                raise

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def _reconcile(self, body: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        previous = dict(body.get("status") or {})
        generation = int(meta.get("generation") or 0)
        try:
            dlm = api.parse(body, self.settings)
        except api.SpecError as exc:
            log.warning("%s/%s: invalid spec: %s", meta.get("namespace"), meta.get("name"), exc)
            return compute_status(Observation(generation, invalid=str(exc)), previous, rfc3339(now))

        obs = Observation(generation, suspended=dlm.suspend, cache_mode=dlm.cache.mode)
        self._apply_optional(build_pvc(dlm), obs)
        download = self._download(dlm, obs, previous.get("download") or {}, now)
        self._runtime(dlm, obs)
        self._inference_service(dlm, obs, previous.get("storageUri"))

        status = compute_status(obs, previous, rfc3339(now))
        status["servedModelName"] = dlm.model.served_model_name
        status["deploymentMode"] = ((obs.isvc or {}).get("metadata", {}).get("annotations") or {}).get(MODE_ANNOTATION)
        status["download"] = download
        return status

    # ------------------------------------------------------------------ children
    def _apply_optional(self, obj: dict | None, obs: Observation) -> dict | None:
        if obj is None:
            return None
        try:
            return self.kube.apply(obj)
        except KubeError as exc:
            if exc.retryable:
                raise
            # 403 (RBAC), 422 (immutable field changed, webhook said no): report it, do not crash-loop.
            obs.apply_errors.append(f"{obj['kind']} {obj['metadata']['name']}: {exc.message or exc.reason}")
            return None

    def _download(self, dlm: api.DiffusionLM, obs: Observation, previous: dict[str, Any],
                  now: dt.datetime) -> dict[str, Any] | None:
        target = download_target(dlm)
        obs.desired_uri = target.storage_uri if target else dlm.model.uri
        if target is None:
            return None
        record = dict(previous) if previous.get("jobName") == target.job_name else {}
        record.update(jobName=target.job_name, revision=target.revision, storageUri=target.storage_uri)
        attempts = int(record.get("attempts") or 0)
        ns = dlm.namespace
        job = self.kube.get("batch/v1", "Job", ns, target.job_name)
        state = job_state(job)
        if job is not None:
            # The Job records its attempt number: the count survives a status write that was lost.
            recorded = ((job.get("metadata") or {}).get("annotations") or {}).get(ATTEMPT_ANNOTATION, "1")
            attempts = max(attempts, int(recorded) if recorded.isdigit() else 1)
        pods: list[dict] = []
        if state in ("Running", "Pending", "Failed"):
            pods = self.kube.list("v1", "Pod", ns, label_selector=f"job-name={target.job_name}")
        failure: DownloadFailure | None = None
        if state == "Failed":
            failure = failure_from_pods(pods) or failure_from_job(job)
            failed_at = next((c.get("lastTransitionTime") for c in job["status"].get("conditions") or []
                              if c.get("type") == "Failed"), None) or rfc3339(now)
            record["lastFailure"] = {"reason": failure.reason, "message": failure.message[:1024], "time": failed_at}
        elif state == "Running":
            # An earlier pod of this Job may have failed (the Job retries pods with backoff).
            failure = failure_from_pods(pods)
            if failure is not None:
                record["lastFailure"] = {"reason": failure.reason, "message": failure.message[:1024],
                                         "time": record.get("lastFailure", {}).get("time") or rfc3339(now)}
            pod = newest_pod_name([p for p in pods if (p.get("status") or {}).get("phase") == "Running"] or pods)
            if pod:
                progress = parse_progress(self.kube.pod_log(ns, pod, self.settings.progress_log_bytes))
                if progress:
                    record.update(progress)
                    obs.progress = progress
        elif state == "Complete":
            record.pop("lastFailure", None)
            if record.get("bytesTotal"):
                record["bytesDone"] = record["bytesTotal"]
        if failure is None and state in ("Absent",) and record.get("lastFailure"):
            last = record["lastFailure"]
            failure = DownloadFailure(last.get("reason", "Unknown"), last.get("message", ""))

        failed_at = parse_time((record.get("lastFailure") or {}).get("time"))
        since = (now - failed_at).total_seconds() if failed_at else None
        decision = decide(state, attempts, dlm.cache.download.max_attempts, since,
                          self.settings.download_retry_base_seconds, self.settings.download_retry_max_seconds)
        if decision.action == "retry":
            log.info("%s/%s: retrying failed download Job %s", ns, dlm.name, target.job_name)
            self.kube.delete("batch/v1", "Job", ns, target.job_name)
            state = "Absent"
        elif decision.action == "create":
            try:
                self.kube.create(build_download_job(dlm, attempt=attempts + 1))
                attempts += 1
                state = "Pending"
            except KubeError as exc:
                if exc.status == 409:  # the previous one is still being deleted: next pass
                    pass
                elif exc.retryable:
                    raise
                else:
                    obs.apply_errors.append(f"Job {target.job_name}: {exc.message or exc.reason}")
        elif decision.action == "give_up":
            obs.download_gave_up = True
        elif decision.action == "wait":
            obs.download_retry_in_s = decision.wait_s
        record["attempts"] = attempts
        obs.job_state, obs.job_name, obs.download_failure = state, target.job_name, failure
        return record

    def _runtime(self, dlm: api.DiffusionLM, obs: Observation) -> None:
        sr = build_serving_runtime(dlm, self.settings)
        if sr is not None:
            obs.runtime_name = sr["metadata"]["name"]
            errors_before = len(obs.apply_errors)
            self._apply_optional(sr, obs)
            if len(obs.apply_errors) > errors_before:
                obs.runtime_error = obs.apply_errors.pop()
            return
        name = dlm.runtime.serving_runtime_name
        obs.runtime_name = name
        found = self.kube.get("serving.kserve.io/v1alpha1", "ServingRuntime", dlm.namespace, name)
        if found is None:
            try:
                found = self.kube.get("serving.kserve.io/v1alpha1", "ClusterServingRuntime", None, name)
            except KubeError as exc:
                if exc.retryable:
                    raise
                found = None
        obs.runtime_found = found is not None

    def _inference_service(self, dlm: api.DiffusionLM, obs: Observation, last_served: str | None) -> None:
        """Serve the desired URI once it is downloaded; until then keep serving what was served.

        `last_served` (the status' `storageUri`) stands in for an InferenceService deleted by hand
        mid-rollout: it comes back on the old revision at once, not after the new download.
        """
        existing = self.kube.get("serving.kserve.io/v1beta1", "InferenceService", dlm.namespace, dlm.name)
        current_uri = (((existing or {}).get("spec") or {}).get("predictor") or {}).get("model", {}).get("storageUri")
        if obs.cache_mode == "None" or obs.job_state == "Complete":
            uri = obs.desired_uri
        else:
            uri = current_uri or last_served  # the previous revision stays on the cache until the switch
        obs.isvc, obs.serving_uri = existing, current_uri
        if not uri:
            return
        mode = resolve_deployment_mode(dlm.serving.deployment_mode,
                                       self.kserve.get(self.kube, self.settings.kserve_namespace))
        current_mode = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(MODE_ANNOTATION)
        if current_mode and is_knative(current_mode) == is_knative(mode):
            mode = current_mode  # same mode, other spelling: KServe rejects changing the annotation
        applied = self._apply_optional(build_inference_service(dlm, uri, mode, self.settings), obs)
        if applied is not None:
            obs.isvc, obs.serving_uri = applied, uri
