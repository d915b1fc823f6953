"""`dllm-serve download` against a real HTTP hub on loopback (HF_ENDPOINT), run as a subprocess.

The fake hub implements the two endpoint families huggingface_hub uses for a download:
`GET /api/models/{repo}/revision/{rev}` (file listing with sizes) and `HEAD`/`GET
/{repo}/resolve/{rev}/{path}` (metadata headers, Range requests). Nothing is mocked inside the
process under test: it is the installed console script talking HTTP.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlsplit

import pytest

from dllm_runtime.cli import main
from dllm_runtime.download import DEFAULT_ALLOW_PATTERNS, DownloadError, RemoteFile, classify, select_files
from dllm_runtime.models import load_model
from tests.helpers.tiny_models import make_tiny_model_dir

REPO = "acme/tiny-llada"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_secret"


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    private: bool = False
    gated: bool = False
    #: file name → number of bytes after which the first GET is cut off (connection closed)
    cut_after: dict[str, int] = field(default_factory=dict)
    #: listed by the API but 404 on download (a file deleted between listing and fetching)
    vanished: set[str] = field(default_factory=set)


class FakeHub:
    """A minimal Hugging Face Hub on 127.0.0.1 with a request log."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.fail_status: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply(self, h, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str | None, head: bool):
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self._reply(h, status, json.dumps({"error": code or "error"}).encode(), headers, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if self.fail_status is not None:
            return self._error(h, self.fail_status, None, head)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            repo_id, _, rev = rest.partition("/revision/")
            rev = rev or "main"  # /api/models/{repo} describes the default branch
            return self._info(h, repo_id, rev, head)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        return self._error(h, 404, None, head)

    def _authorized(self, h, repo: FakeRepo) -> bool:
        return not (repo.private or repo.gated) or h.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _info(self, h, repo_id: str, rev: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        if not self._authorized(h, repo):
            return self._error(h, 403 if repo.gated else 401, "GatedRepo" if repo.gated else "RepoNotFound", head)
        if rev not in ("main", COMMIT):
            return self._error(h, 404, "RevisionNotFound", head)
        siblings = []
        for n, b in repo.files.items():
            entry = {"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
            if n.endswith(".safetensors"):  # LFS files carry their sha256 in the listing
                entry["lfs"] = {"size": len(b), "sha256": hashlib.sha256(b).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": repo.private, "siblings": siblings})
        self._reply(h, 200, body.encode(), {"Content-Type": "application/json"}, head)

    def _file(self, h, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", head)
        if not self._authorized(h, repo):
            return self._error(h, 401, "RepoNotFound", head)
        if rev not in ("main", COMMIT):
            return self._error(h, 404, "RevisionNotFound", head)
        if name not in repo.files or name in repo.vanished:
            return self._error(h, 404, "EntryNotFound", head)
        data = repo.files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0])
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        cut = repo.cut_after.pop(name, None) if not head else None
        if cut is not None:  # announce the full length, send part of it, drop the connection
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            return
        self._reply(h, status, body, headers, head)


@pytest.fixture()
def hub():
    server = FakeHub()
    yield server
    server.close()


def _tiny_repo_files() -> dict[str, bytes]:
    weights = bytes(range(256)) * 2048  # 512 KiB, several network reads
    return {
        "config.json": json.dumps({"model_type": "llada"}).encode(),
        "model.safetensors": weights,
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "modeling_llada.py": b"raise SystemExit('remote code must never be downloaded')",
        "pytorch_model.bin": b"x" * 100,
        "README.md": b"# tiny",
    }


def _run(
    hub: FakeHub, tmp_path: Path, *args: str, token: str | None = None, subprocess_: bool = False
) -> tuple[int, list[dict], Path]:
    """Run `dllm-serve download` against `hub`.

    `subprocess_=True` runs the console entry point in a fresh interpreter with `HF_ENDPOINT` set
    (what a Job pod does); otherwise the same CLI runs in this process with `--endpoint` (faster:
    the 2-core CI box pays ~2 s per interpreter start).
    """
    out = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if token:
        env["HF_TOKEN"] = token
    argv = ["download", "--repo-id", REPO, "--output", str(out), "--retry-backoff", "0", "--progress-interval", "0", *args]
    if subprocess_:
        env["HF_ENDPOINT"] = hub.url
        cmd = [sys.executable, "-c", "import sys; from dllm_runtime.cli import main; sys.exit(main())", *argv]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        buf, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, env, clear=True), redirect_stdout(buf), redirect_stderr(err):
            rc = main([*argv, "--endpoint", hub.url])
        stdout, stderr = buf.getvalue(), err.getvalue()
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert events, f"no JSON events; stderr:\n{stderr[-2000:]}"
    return rc, events, out


def test_successful_download_selects_runtime_files_and_reports_progress(hub, tmp_path):
    files = _tiny_repo_files()
    hub.repos[REPO] = FakeRepo(files)
    progress_file, term = tmp_path / "progress.json", tmp_path / "termination-log"
    rc, events, out = _run(
        hub, tmp_path, "--progress-file", str(progress_file), "--termination-log", str(term), subprocess_=True
    )
    assert rc == 0, events
    wanted = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for name in wanted:
        assert (out / name).read_bytes() == files[name]
    for skipped in ("modeling_llada.py", "pytorch_model.bin", "README.md"):
        assert not (out / skipped).exists()
    done = events[-1]
    total = sum(len(files[n]) for n in wanted)
    assert done["event"] == "done" and done["revision"] == COMMIT and done["files"] == 4 and done["bytes"] == total
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1] == {"event": "progress", "bytes_done": total, "bytes_total": total, "files_done": 4, "files_total": 4}
    assert [e["bytes_done"] for e in progress] == sorted(e["bytes_done"] for e in progress), "progress must not go back"
    assert json.loads(term.read_text())["event"] == "done"
    assert json.loads(progress_file.read_text())["event"] == "done"
    # every file was fetched at the resolved commit, not at the moving branch name
    assert all(f"/resolve/{COMMIT}/" in p for m, p, _ in hub.requests if "/resolve/" in p)

    # a second run is idempotent: nothing is downloaded again
    hub.requests.clear()
    rc, events, _ = _run(hub, tmp_path)
    assert rc == 0 and events[-1]["event"] == "done"
    assert not [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def test_interrupted_download_resumes_in_a_new_process(hub, tmp_path):
    """A Job pod killed mid-file: the next pod continues the partial file with a Range request."""
    files = _tiny_repo_files()
    cut = 200_000
    hub.repos[REPO] = FakeRepo(files, cut_after={"model.safetensors": cut})
    args = ("--allow-pattern", "*.safetensors", "--allow-pattern", "config.json", "--max-retries", "0")
    rc, events, out = _run(hub, tmp_path, *args, subprocess_=True)
    assert rc == 1 and events[-1]["reason"] == "Network", events
    assert not (out / "model.safetensors").exists(), "an incomplete file must never appear under its final name"
    rc, events, out = _run(hub, tmp_path, *args, subprocess_=True)
    assert rc == 0, events
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
    gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("model.safetensors")]
    assert [g[2] for g in gets] == [None, f"bytes={cut}-"], "second run must continue at the cut, not restart"


def test_in_process_retry_continues_and_sha256_is_checked(hub, tmp_path):
    files = _tiny_repo_files()
    hub.repos[REPO] = FakeRepo(files, cut_after={"model.safetensors": 1000})
    rc, events, out = _run(hub, tmp_path, "--allow-pattern", "*.safetensors", "--max-retries", "2")
    assert rc == 0, events
    assert [e["attempt"] for e in events if e["event"] == "retry"] == [1]
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]

    # a corrupted partial (right size, wrong bytes) is caught by the listing's sha256 and refetched
    (out / "model.safetensors").unlink()
    partial = out / ".cache" / "dllm-download" / "model.safetensors.part"
    partial.write_bytes(b"\0" * len(files["model.safetensors"]))
    rc, events, out = _run(hub, tmp_path, "--allow-pattern", "*.safetensors", "--max-retries", "1")
    assert rc == 0, events
    assert "sha256 mismatch" in next(e["message"] for e in events if e["event"] == "retry")
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_sharded_repo_downloads_in_parallel_and_loads(hub, tmp_path):
    """A real tiny checkpoint, sharded, fetched with 3 workers, then loaded by the model loader."""
    src = make_tiny_model_dir(tmp_path / "src", arch="llada", shards=3, n_layers=1)
    assert len(list(src.glob("model-*-of-00003.safetensors"))) == 3
    hub.repos[REPO] = FakeRepo({p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})

    rc, events, out = _run(hub, tmp_path, "--max-workers", "3")
    assert rc == 0, events
    assert events[-1]["files"] == len(hub.repos[REPO].files)
    progress = [e["bytes_done"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress), "parallel workers must still report monotonic progress"
    model = load_model(out)
    assert model.num_layers == 1 and model.special_ids.mask == 126336


def test_file_vanishing_after_listing_fails_the_download(hub, tmp_path):
    files = _tiny_repo_files()
    hub.repos[REPO] = FakeRepo(files, vanished={"tokenizer.json"})
    rc, events, out = _run(hub, tmp_path, "--max-workers", "2")
    assert rc == 4 and events[-1]["reason"] == "NotFound" and "tokenizer.json" in events[-1]["message"]
    assert not (out / ".dllm-download.json").exists(), "no completion marker after a failure"


def test_private_repo_without_token_is_unauthorized(hub, tmp_path):
    hub.repos[REPO] = FakeRepo(_tiny_repo_files(), private=True)
    term = tmp_path / "termination-log"
    rc, events, _ = _run(hub, tmp_path, "--termination-log", str(term), subprocess_=True)
    assert rc == 3
    assert events[-1]["event"] == "error" and events[-1]["reason"] == "Unauthorized"
    assert json.loads(term.read_text())["reason"] == "Unauthorized"


def test_private_repo_with_token_file_downloads(hub, tmp_path):
    hub.repos[REPO] = FakeRepo(_tiny_repo_files(), private=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    rc, events, out = _run(hub, tmp_path, "--token-file", str(token_file))
    assert rc == 0, events
    assert (out / "config.json").is_file()
    assert TOKEN not in json.dumps(events), "the token must never be printed"


def test_gated_repo_with_env_token_but_wrong_value(hub, tmp_path):
    hub.repos[REPO] = FakeRepo(_tiny_repo_files(), gated=True)
    rc, events, _ = _run(hub, tmp_path, token="hf_wrong")
    assert rc == 3 and events[-1]["reason"] == "Unauthorized"
    assert "gated" in events[-1]["message"]


def test_missing_repo_and_revision_are_not_found(hub, tmp_path):
    rc, events, _ = _run(hub, tmp_path)
    assert rc == 4 and events[-1]["reason"] == "NotFound"
    hub.repos[REPO] = FakeRepo(_tiny_repo_files())
    rc, events, _ = _run(hub, tmp_path, "--revision", "v9")
    assert rc == 4 and events[-1]["reason"] == "NotFound"


def test_no_matching_files_is_not_found(hub, tmp_path):
    hub.repos[REPO] = FakeRepo({"README.md": b"# nothing to serve"})
    rc, events, _ = _run(hub, tmp_path)
    assert rc == 4 and "allow patterns" in events[-1]["message"]


def test_server_errors_are_network_and_retried(hub, tmp_path):
    hub.repos[REPO] = FakeRepo(_tiny_repo_files())
    hub.fail_status = 503
    rc, events, _ = _run(hub, tmp_path, "--max-retries", "1")
    assert rc == 1 and events[-1]["reason"] == "Network"
    assert [e["attempt"] for e in events if e["event"] == "retry"] == [1]


def test_unreachable_endpoint_is_network(tmp_path):
    class Closed:  # a port with nothing listening
        url = "http://127.0.0.1:9"

    rc, events, _ = _run(Closed(), tmp_path, "--max-retries", "0")  # type: ignore[arg-type]
    assert rc == 1 and events[-1]["reason"] == "Network"


def test_bad_repo_id_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from dllm_runtime.cli import main; sys.exit(main())", "download",
         "--repo-id", "no-slash", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "ORG/NAME" in proc.stderr


def test_select_files_and_classify_units():
    names = ["config.json", "model-00001-of-00002.safetensors", "modeling.py", "sub/tokenizer.json", "x.bin"]
    siblings = [RemoteFile(n, 1) for n in names]
    selected = [f.name for f in select_files(siblings, DEFAULT_ALLOW_PATTERNS)]
    assert selected == ["config.json", "model-00001-of-00002.safetensors"]  # top level only, no code, no .bin
    assert classify(OSError(28, "No space left on device")).reason == "NoSpace"
    assert classify(RuntimeError("boom")).reason == "Unknown"
    assert DownloadError("NotFound", "x").exit_code == 4


def test_insufficient_space_fails_before_downloading(hub, tmp_path, monkeypatch):
    """A full volume cannot be made here, so the free-space probe is the one faked part (in process)."""
    import shutil as real_shutil

    from dllm_runtime import download as dl

    hub.repos[REPO] = FakeRepo(_tiny_repo_files())
    real = real_shutil.disk_usage
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    events: list[dict] = []
    term = tmp_path / "termination-log"
    spec = dl.DownloadSpec(repo_id=REPO, output=tmp_path / "model", endpoint=hub.url, max_retries=0, progress_interval_s=0)
    rc = dl.download(spec, events.append, termination_log=term)
    assert rc == 5 and events[-1]["reason"] == "NoSpace" and "1000 free" in events[-1]["message"]
    assert json.loads(term.read_text())["reason"] == "NoSpace"
    assert not [r for r in hub.requests if "/resolve/" in r[1]], "nothing may be fetched once space is known short"


def test_termination_log_is_bounded(tmp_path):
    from dllm_runtime.download import TERMINATION_LOG_LIMIT, write_termination_log

    path = tmp_path / "termination-log"
    write_termination_log(path, {"event": "error", "reason": "Unknown", "message": "x" * 10_000})
    text = path.read_text()
    assert len(text.encode()) <= TERMINATION_LOG_LIMIT and json.loads(text)["message"].endswith("...")
