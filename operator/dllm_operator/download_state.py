"""Reading a download Job's state, progress and failure reason, and deciding when to retry it.

The download command (`dllm-serve download`) prints JSON lines on stdout
(`{"event":"progress","bytes_done":..}`, then `done` or `error`) and writes its final error line to the
termination log; its exit code says why it failed (3 auth, 4 not found, 5 no space). Pure functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

EXIT_REASONS = {3: "Unauthorized", 4: "NotFound", 5: "NoSpace"}
#: failures a retry cannot fix without a user change; still retried (the user may fix the Secret or the
#: quota meanwhile) but reported as such
PERMANENT_REASONS = frozenset({"Unauthorized", "NotFound"})


@dataclass(frozen=True)
class DownloadFailure:
    reason: str
    message: str


def job_state(job: dict | None) -> str:
    """Absent | Pending | Running | Complete | Failed, from the Job's conditions and counters."""
    if job is None:
        return "Absent"
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"]
    return "Running" if status.get("active") else "Pending"


def _parse_error_line(text: str | None) -> DownloadFailure | None:
    for line in reversed((text or "").strip().splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "error":
            return DownloadFailure(str(event.get("reason") or "Unknown"), str(event.get("message") or ""))
    return None


def failure_from_pods(pods: list[dict]) -> DownloadFailure | None:
    """The newest terminated download container's reason: its JSON error line, else its exit code."""
    newest: tuple[str, dict] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state_key in ("state", "lastState"):
                term = (cs.get(state_key) or {}).get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    stamp = term.get("finishedAt") or ""
                    if newest is None or stamp > newest[0]:
                        newest = (stamp, term)
    if newest is None:
        return None
    term = newest[1]
    parsed = _parse_error_line(term.get("message"))
    if parsed:
        return parsed
    code = int(term.get("exitCode") or 1)
    reason = EXIT_REASONS.get(code, "Unknown")
    message = (term.get("message") or term.get("reason") or f"exit code {code}").strip()
    return DownloadFailure(reason, message[-512:])


def failure_from_job(job: dict) -> DownloadFailure:
    """Fallback when no pod explains the failure (pods garbage-collected, deadline hit)."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            reason = "Timeout" if cond.get("reason") == "DeadlineExceeded" else "Unknown"
            return DownloadFailure(reason, cond.get("message") or cond.get("reason") or "download Job failed")
    return DownloadFailure("Unknown", "download Job failed")


def parse_progress(log: str | None) -> dict[str, int] | None:
    """bytesDone/bytesTotal/filesDone/filesTotal of the last progress (or done) line of a log tail."""
    for line in reversed((log or "").strip().splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("event") not in ("progress", "done"):
            continue
        out = {}
        for src, dst in (("bytes_done", "bytesDone"), ("bytes_total", "bytesTotal"),
                         ("files_done", "filesDone"), ("files_total", "filesTotal")):
            value = event.get(src)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                out[dst] = value
        if out:
            return out
    return None


def retry_delay(attempts: int, base_s: float, cap_s: float) -> float:
    """Pause before Job number `attempts + 1`: base, 2*base, 4*base ... capped."""
    if attempts <= 1:
        return min(base_s, cap_s)
    return min(cap_s, base_s * (2 ** (attempts - 1)))


@dataclass(frozen=True)
class DownloadDecision:
    #: create | wait | retry (delete the failed Job; the next pass creates a new one) | give_up | none
    action: str
    #: seconds until the next action is due (for `wait`)
    wait_s: float = 0.0


def decide(state: str, attempts: int, max_attempts: int, seconds_since_failure: float | None,
           base_s: float, cap_s: float) -> DownloadDecision:
    """What to do with the current revision's Job, given how many Jobs ran and when the last one failed."""
    if state in ("Complete", "Running", "Pending"):
        return DownloadDecision("none")
    if attempts >= max_attempts:
        return DownloadDecision("give_up")
    delay = retry_delay(attempts, base_s, cap_s) if attempts else 0.0
    elapsed = seconds_since_failure if seconds_since_failure is not None else float("inf")
    if state == "Failed":
        return DownloadDecision("retry") if elapsed >= delay else DownloadDecision("wait", delay - elapsed)
    # Absent: first Job, or the failed one was deleted for a retry.
    if attempts and elapsed < delay:
        return DownloadDecision("wait", delay - elapsed)
    return DownloadDecision("create")


def newest_pod_name(pods: list[dict]) -> str | None:
    if not pods:
        return None
    pods = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return pods[-1]["metadata"]["name"]

