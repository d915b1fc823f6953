"""Resumable model download from the Hugging Face Hub into a plain folder (the model-cache PVC).

Runs as the operator's download Job (and by hand). Design points:

* The revision is resolved to a commit once and every file is fetched at that commit, so a branch
  that moves mid-download cannot mix two snapshots.
* Only what the runtime loads is fetched (config, safetensors, tokenizer, generation config);
  remote code (`*.py`) and PyTorch `.bin` weights are never downloaded, since neither is used.
* Files stream into `<output>/.cache/dllm-download/<name>.part` and continue with HTTP Range
  requests, so a restarted Job (a new process) continues where the last one stopped.
  (`hf_hub_download` in huggingface_hub 1.x+ deletes partial files when a process dies, so the
  transfer itself is ours; the listing, URLs, auth headers and error types are huggingface_hub's.)
* Completed files are checked against the size, and the sha256 for LFS files, from the listing,
  then renamed into place atomically: a file under its final name is always complete.
* Progress and the outcome are JSON lines on stdout (pod logs); the final event also goes to a
  termination-log file (Kubernetes `terminationMessagePath`) so the operator can report *why* a
  download failed (`Unauthorized`, `NotFound`, `NoSpace`, `Network`, `Unknown`) without reading logs.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

#: Exit codes of `dllm-serve download` (the operator maps them to a condition reason).
EXIT_CODES: dict[str, int] = {"Unauthorized": 3, "NotFound": 4, "NoSpace": 5, "Network": 1, "Unknown": 1}
MARKER_FILE = ".dllm-download.json"
PARTIAL_DIR = Path(".cache") / "dllm-download"
CHUNK_BYTES = 1 << 20
#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LOG_LIMIT = 4096


class DownloadError(Exception):
    """A classified download failure; `reason` is one of `EXIT_CODES`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, 1)


@dataclass
class DownloadSpec:
    repo_id: str
    output: Path
    revision: str | None = None
    token: str | None = None
    endpoint: str | None = None
    allow_patterns: Sequence[str] = DEFAULT_ALLOW_PATTERNS
    max_retries: int = 3
    retry_backoff_s: float = 2.0
    progress_interval_s: float = 2.0
    timeout_s: float = 60.0
    max_workers: int = 4


class Progress:
    """Aggregate progress over all selected files (thread-safe); emits throttled `progress` events."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], interval_s: float) -> None:
        self.emit = emit
        self.interval_s = interval_s
        self.bytes_total = 0
        self.files_total = 0
        self.bytes_done = 0  # bytes of completed files
        self.files_done = 0
        self._in_flight: dict[str, int] = {}  # file name -> bytes so far
        self._last = 0.0
        self._lock = threading.Lock()

    def event(self) -> dict[str, Any]:
        with self._lock:
            return self._event()

    def _event(self) -> dict[str, Any]:
        return {
            "event": "progress",
            "bytes_done": self.bytes_done + sum(self._in_flight.values()),
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
        }

    def file_bytes(self, name: str, n: int) -> None:
        with self._lock:  # emitting under the lock keeps the printed events in order
            self._in_flight[name] = n
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                self.emit(self._event())

    def file_done(self, name: str, size: int) -> None:
        with self._lock:
            self._in_flight.pop(name, None)
            self.bytes_done += size
            self.files_done += 1
            self._last = time.monotonic()
            self.emit(self._event())


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None = None  # known for LFS files


def select_files(siblings: Sequence[RemoteFile], patterns: Sequence[str]) -> list[RemoteFile]:
    """Repository files matching any allow pattern (fnmatch on the path, as huggingface_hub does)."""
    return [f for f in siblings if any(fnmatch.fnmatch(f.name, p) for p in patterns)]


def ensure_writable_hf_home(output: Path) -> None:
    """Point HF_HOME into the output folder when the default is not writable.

    OpenShift runs pods with an arbitrary UID and often `HOME=/`; huggingface_hub writes lock and
    xet cache files under HF_HOME, which must therefore be writable. Must run before importing it.
    """
    if os.environ.get("HF_HOME"):
        return
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    probe = default if default.exists() else default.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        os.environ["HF_HOME"] = str(output / ".cache" / "hf-home")


def classify(exc: BaseException) -> DownloadError:
    """Map huggingface_hub / httpx / OS exceptions to a stable reason."""
    if isinstance(exc, DownloadError):
        return exc
    from huggingface_hub import errors as hf_errors

    message = _summary(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError("NoSpace", f"no space left on the output volume: {exc}")
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError("Unauthorized", f"gated repository: accept its terms and use a token with access ({message})")
    status = _status_of(exc)
    if status in (401, 403):
        return DownloadError(
            "Unauthorized", f"HTTP {status}: repository is private, gated or missing, or the token lacks access ({message})"
        )
    if isinstance(
        exc, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError)
    ) or status == 404:
        return DownloadError("NotFound", f"not found: {message}")
    if status is not None and (status >= 500 or status == 429):
        return DownloadError("Network", f"HTTP {status} from the hub (retryable): {message}")
    if _is_network(exc):
        return DownloadError("Network", f"network error: {message}")
    return DownloadError("Unknown", f"{type(exc).__name__}: {message}")


def _summary(exc: BaseException, limit: int = 400) -> str:
    """The first two non-empty lines of an exception (huggingface_hub puts the URL on line 2)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _is_network(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:  # the cause chain: hf wraps httpx errors
        seen.add(id(cur))
        if isinstance(cur, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if type(cur).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class Downloader:
    """Resolve, select, check space, and fetch each file with resume and bounded retries."""

    def __init__(self, spec: DownloadSpec, emit: Callable[[dict[str, Any]], None]) -> None:
        self.spec = spec
        self.emit = emit
        self.progress = Progress(emit, spec.progress_interval_s)
        self._stop = threading.Event()

    def run(self) -> dict[str, Any]:
        spec = self.spec
        spec.output.mkdir(parents=True, exist_ok=True)
        commit, files = self._retrying(self._resolve)
        if not files:
            raise DownloadError(
                "NotFound", f"{spec.repo_id}@{commit}: no files match the allow patterns {list(spec.allow_patterns)}"
            )
        self.progress.files_total = len(files)
        self.progress.bytes_total = sum(f.size for f in files)
        self._check_space(files)
        self.emit({**self.progress.event(), "revision": commit})
        self._fetch_all(commit, files)
        result = {
            "event": "done",
            "repo_id": spec.repo_id,
            "revision": commit,
            "files": len(files),
            "bytes": self.progress.bytes_total,
            "output": str(spec.output),
        }
        _atomic_write(spec.output / MARKER_FILE, json.dumps({**result, "file_list": [f.name for f in files]}, indent=2))
        return result

    def _fetch_all(self, commit: str, files: list[RemoteFile]) -> None:
        """Fetch files on `max_workers` threads, largest first; the first failure stops the rest."""

        def one(remote: RemoteFile) -> None:
            if self._stop.is_set():
                return
            self._retrying(lambda: self._fetch(commit, remote))
            self.progress.file_done(remote.name, remote.size)

        ordered = sorted(files, key=lambda f: -f.size)  # shards first: they bound the total time
        workers = max(1, min(self.spec.max_workers, len(ordered)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            futures = [pool.submit(one, f) for f in ordered]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                self._stop.set()  # in-flight transfers stop at their next chunk; queued ones never start
                for future in futures:
                    future.cancel()
                raise

    def _resolve(self) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.spec.endpoint, token=self.spec.token)
        info = api.model_info(
            self.spec.repo_id, revision=self.spec.revision, files_metadata=True, timeout=self.spec.timeout_s
        )
        siblings = [
            RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs is not None else None)
            for s in (info.siblings or [])
        ]
        commit = info.sha or self.spec.revision or "main"
        return commit, select_files(siblings, self.spec.allow_patterns)

    def _check_space(self, files: list[RemoteFile]) -> None:
        needed = 0
        for f in files:
            final, part = self._paths(f)
            if not (final.is_file() and final.stat().st_size == f.size):
                needed += f.size - (part.stat().st_size if part.is_file() else 0)
        free = shutil.disk_usage(self.spec.output).free
        if needed > free:
            raise DownloadError("NoSpace", f"{self.spec.output}: needs {needed} more bytes, {free} free")

    def _paths(self, f: RemoteFile) -> tuple[Path, Path]:
        out = self.spec.output.resolve()
        final = (out / f.name).resolve()
        if out not in final.parents:  # a hostile listing must not write outside the output folder
            raise DownloadError("Unknown", f"refusing file name outside the output folder: {f.name!r}")
        return final, out / PARTIAL_DIR / (f.name + ".part")

    def _fetch(self, commit: str, f: RemoteFile) -> None:
        """Stream one file into its `.part`, continuing from its current size; verify; rename."""
        import httpx
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        final, part = self._paths(f)
        if final.is_file() and final.stat().st_size == f.size:
            return
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > f.size:  # stale partial of another revision
            part.unlink()
            offset = 0
        url = hf_hub_url(self.spec.repo_id, f.name, revision=commit, endpoint=self.spec.endpoint)
        headers = build_hf_headers(token=self.spec.token, library_name="dllm-serve")
        headers["Accept-Encoding"] = "identity"  # sizes and ranges refer to the raw bytes
        if 0 < offset < f.size:
            headers["Range"] = f"bytes={offset}-"
        if offset < f.size or f.size == 0:
            with httpx.Client(follow_redirects=True, timeout=self.spec.timeout_s) as client:
                with client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 416:  # our partial no longer matches the remote file
                        part.unlink(missing_ok=True)
                        raise DownloadError("Network", f"{f.name}: range not satisfiable, restarting the file")
                    if response.status_code >= 400:
                        response.read()  # hf_raise_for_status reads the error body
                    hf_raise_for_status(response)
                    if offset and response.status_code != 206:  # server ignored the Range: start over
                        offset = 0
                    with part.open("r+b" if offset else "wb") as out:
                        out.seek(offset)
                        out.truncate()
                        done = offset
                        self.progress.file_bytes(f.name, done)
                        for chunk in response.iter_bytes():  # as received: a drop loses nothing written
                            if self._stop.is_set():
                                raise DownloadError("Unknown", "stopped: another file failed")
                            out.write(chunk)
                            done += len(chunk)
                            self.progress.file_bytes(f.name, done)
        self._verify(f, part)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)

    @staticmethod
    def _verify(f: RemoteFile, part: Path) -> None:
        size = part.stat().st_size
        if size != f.size:
            # short: the connection dropped (resumable); long: corrupt partial (start over)
            if size > f.size:
                part.unlink()
            raise DownloadError("Network", f"{f.name}: got {size} of {f.size} bytes")
        if f.sha256:
            digest = hashlib.sha256()
            with part.open("rb") as fh:
                for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                    digest.update(block)
            if digest.hexdigest() != f.sha256:
                part.unlink()
                raise DownloadError("Network", f"{f.name}: sha256 mismatch, the file will be downloaded again")

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Retry network-class failures with linear backoff; everything else fails at once."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # classified below; KeyboardInterrupt/SystemExit pass through
                err = classify(exc)
                if err.reason != "Network" or attempt >= self.spec.max_retries or self._stop.is_set():
                    raise err from exc
                attempt += 1
                self.emit({"event": "retry", "attempt": attempt, "reason": err.reason, "message": str(err)})
                time.sleep(self.spec.retry_backoff_s * attempt)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the serving pod may run under another UID
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EventWriter:
    """JSON lines to a stream; the latest event also replaces `progress_file` (if given)."""

    def __init__(self, stream: TextIO | None = None, progress_file: Path | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.progress_file = progress_file
        self._lock = threading.Lock()  # download threads emit concurrently

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            if self.progress_file is not None:
                try:
                    _atomic_write(self.progress_file, line + "\n")
                except OSError:
                    pass  # progress reporting must never fail the download itself


def write_termination_log(path: Path | None, event: dict[str, Any]) -> None:
    """Write the final event, bounded to Kubernetes' 4096-byte termination-message limit."""
    if path is None:
        return
    event = dict(event)
    text = json.dumps(event, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LOG_LIMIT and "message" in event:
        overflow = len(text.encode()) - TERMINATION_LOG_LIMIT + 3
        event["message"] = event["message"][: max(0, len(event["message"]) - overflow)] + "..."
        text = json.dumps(event, separators=(",", ":"))
    try:
        path.write_text(text[:TERMINATION_LOG_LIMIT], encoding="utf-8")
    except OSError:
        pass


def download(spec: DownloadSpec, emit: Callable[[dict[str, Any]], None], termination_log: Path | None = None) -> int:
    """Run one download; returns the process exit code (0, or `EXIT_CODES[reason]`)."""
    ensure_writable_hf_home(spec.output)
    try:
        result = Downloader(spec, emit).run()
    except DownloadError as err:
        event = {"event": "error", "reason": err.reason, "message": str(err)}
        emit(event)
        write_termination_log(termination_log, event)
        return err.exit_code
    except Exception as exc:  # unexpected: still report a structured reason
        err = classify(exc)
        event = {"event": "error", "reason": err.reason, "message": str(err)}
        emit(event)
        write_termination_log(termination_log, event)
        return err.exit_code
    emit(result)
    write_termination_log(termination_log, result)
    return 0
