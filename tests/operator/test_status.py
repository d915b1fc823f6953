"""Conditions, phases, and the download state machine (pure functions)."""

from __future__ import annotations

import json

import pytest

from dllm_operator.download_state import (
    DownloadFailure,
    decide,
    failure_from_job,
    failure_from_pods,
    job_state,
    parse_progress,
    retry_delay,
)
from dllm_operator.status import Observation, compute_status, merge_conditions

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def isvc(ready: str | None, url: str | None = "http://llada.models.svc", state: str | None = None) -> dict:
    status: dict = {}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready, "reason": "R" if ready != "True" else None}]
    if url:
        status["url"] = url
    if state:
        status["modelStatus"] = {"states": {"activeModelState": state}, "transitionStatus": "UpToDate"}
    return {"metadata": {"name": "llada"}, "status": status}


def conds(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_invalid_spec_is_failed_with_reason_and_no_children():
    st = compute_status(Observation(4, invalid="decoding.steps: must be a multiple"), None, T0)
    assert st["phase"] == "Failed" and st["observedGeneration"] == 4
    ready = conds(st)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "decoding.steps" in ready["message"] and ready["observedGeneration"] == 4


def test_downloading_then_deploying_then_ready():
    base = dict(cache_mode="Managed", job_name="llada-dl-1", desired_uri="pvc://c/p", runtime_name="llada")
    st = compute_status(Observation(1, job_state="Running", progress={"bytesDone": 50, "bytesTotal": 200}, **base),
                        None, T0)
    assert st["phase"] == "Downloading"
    c = conds(st)
    assert c["CacheReady"]["reason"] == "Downloading" and "25.0%" in c["CacheReady"]["message"]
    assert c["InferenceServiceReady"]["reason"] == "WaitingForCache" and c["Ready"]["status"] == "False"

    st2 = compute_status(Observation(1, job_state="Complete", isvc=isvc(None, url=None), serving_uri="pvc://c/p",
                                     **base), st, T1)
    assert st2["phase"] == "Deploying" and conds(st2)["CacheReady"]["status"] == "True"
    assert conds(st2)["CacheReady"]["lastTransitionTime"] == T1
    assert conds(st2)["Ready"]["lastTransitionTime"] == T0  # still False: transition time kept

    st3 = compute_status(Observation(1, job_state="Complete", isvc=isvc("True", state="Loaded"),
                                     serving_uri="pvc://c/p", **base), st2, T1)
    assert st3["phase"] == "Ready" and st3["url"] == "http://llada.models.svc"
    assert conds(st3)["Ready"]["status"] == "True"
    assert st3["inferenceService"]["activeModelState"] == "Loaded"


def test_isvc_losing_readiness_is_degraded_and_failed_load_is_failed():
    base = dict(cache_mode="None", desired_uri="s3://b/p", serving_uri="s3://b/p", runtime_name="llada")
    lost = isvc("False", state="Loaded")
    assert compute_status(Observation(1, isvc=lost, **base), None, T0)["phase"] == "Degraded"
    failed = isvc("False", state="FailedToLoad")
    failed["status"]["modelStatus"]["lastFailureInfo"] = {"reason": "ModelLoadFailed", "message": "OOM"}
    st = compute_status(Observation(1, isvc=failed, **dict(base, serving_uri=None)), None, T0)
    assert st["phase"] == "Failed" and st["inferenceService"]["failureMessage"] == "OOM"


def test_new_revision_download_keeps_old_revision_serving():
    obs = Observation(2, cache_mode="Managed", job_state="Running", job_name="j2", isvc=isvc("True"),
                      serving_uri="pvc://c/old", desired_uri="pvc://c/new", runtime_name="llada")
    st = compute_status(obs, None, T0)
    assert st["phase"] == "Ready" and st["storageUri"] == "pvc://c/old"
    assert conds(st)["Ready"]["reason"] == "RollingOut"
    obs.download_failure, obs.job_state = DownloadFailure("NotFound", "revision nope"), "Failed"
    assert compute_status(obs, None, T0)["phase"] == "Degraded"


def test_download_failure_is_reported_with_reason_then_gives_up():
    obs = Observation(1, cache_mode="Managed", job_state="Failed", job_name="j",
                      download_failure=DownloadFailure("Unauthorized", "401 for GSAI-ML/x"), download_retry_in_s=60)
    st = compute_status(obs, None, T0)
    c = conds(st)["CacheReady"]
    assert c["reason"] == "DownloadUnauthorized" and "401" in c["message"] and "retrying in 60s" in c["message"]
    assert st["phase"] == "Downloading"
    obs.download_gave_up = True
    st = compute_status(obs, None, T0)
    assert st["phase"] == "Failed" and "no attempts left" in conds(st)["CacheReady"]["message"]


def test_suspended_and_missing_runtime():
    st = compute_status(Observation(1, suspended=True, cache_mode="None", isvc=isvc("True"), runtime_name="x"),
                        None, T0)
    assert st["phase"] == "Suspended" and conds(st)["Ready"]["reason"] == "Suspended" and st["url"] is None
    st = compute_status(Observation(1, cache_mode="None", runtime_found=False, runtime_name="shared",
                                    isvc=isvc("False")), None, T0)
    assert conds(st)["RuntimeReady"]["reason"] == "RuntimeNotFound"
    assert conds(st)["Ready"]["reason"] == "RuntimeNotFound"


def test_merge_conditions_keeps_transition_time_only_when_status_is_unchanged():
    prev = [{"type": "Ready", "status": "False", "lastTransitionTime": T0}]
    same = merge_conditions(prev, [{"type": "Ready", "status": "False"}], T1)
    flipped = merge_conditions(prev, [{"type": "Ready", "status": "True"}], T1)
    assert same[0]["lastTransitionTime"] == T0 and flipped[0]["lastTransitionTime"] == T1


def test_job_state():
    assert job_state(None) == "Absent"
    assert job_state({"status": {}}) == "Pending"
    assert job_state({"status": {"active": 1}}) == "Running"
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == "Complete"
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "Failed"


def pod(exit_code: int, message: str | None, finished: str = T0, key: str = "state") -> dict:
    term = {"exitCode": exit_code, "finishedAt": finished}
    if message is not None:
        term["message"] = message
    return {"status": {"containerStatuses": [{key: {"terminated": term}}]}}


def test_failure_reason_from_termination_message_or_exit_code():
    line = json.dumps({"event": "error", "reason": "NoSpace", "message": "disk full"})
    assert failure_from_pods([pod(5, line)]) == DownloadFailure("NoSpace", "disk full")
    assert failure_from_pods([pod(3, "Traceback...")]).reason == "Unauthorized"
    assert failure_from_pods([pod(4, None, key="lastState")]).reason == "NotFound"
    newest = failure_from_pods([pod(3, None, T0), pod(5, None, T1)])
    assert newest.reason == "NoSpace"
    assert failure_from_pods([pod(0, None)]) is None
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                      "message": "Job was active longer than specified deadline"}]}}
    assert failure_from_job(job).reason == "Timeout"


def test_progress_is_the_last_progress_line():
    log = "\n".join([
        json.dumps({"event": "progress", "bytes_done": 1, "bytes_total": 10, "files_done": 0, "files_total": 3}),
        "some warning from a library",
        json.dumps({"event": "progress", "bytes_done": 7, "bytes_total": 10, "files_done": 2, "files_total": 3}),
        "{not json",
    ])
    assert parse_progress(log) == {"bytesDone": 7, "bytesTotal": 10, "filesDone": 2, "filesTotal": 3}
    assert parse_progress("") is None and parse_progress(None) is None


@pytest.mark.parametrize(
    "state, attempts, since, expected",
    [
        ("Absent", 0, None, "create"),
        ("Running", 1, None, "none"),
        ("Complete", 1, None, "none"),
        ("Failed", 1, 5.0, "wait"),  # base 30s after the first failure
        ("Failed", 1, 31.0, "retry"),
        ("Absent", 1, 31.0, "create"),
        ("Failed", 2, 31.0, "wait"),  # 60s after the second
        ("Failed", 3, 1e6, "give_up"),
    ],
)
def test_download_retry_decisions(state, attempts, since, expected):
    assert decide(state, attempts, 3, since, 30.0, 600.0).action == expected


def test_retry_delay_doubles_and_is_capped():
    assert [retry_delay(n, 30, 200) for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 200, 200]
