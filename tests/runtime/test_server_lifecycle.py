"""Server lifecycle on the real process: startup errors, readiness before/after the weights exist,
queue limits (429), and SIGTERM draining (in-flight requests finish, new ones get 503, exit 0).

The model folder starts empty and is filled while the server runs (`--model-wait-timeout`, the
modelcar case), which makes "HTTP up, model not ready yet" deterministic instead of a race against
a fast load. A tiny Dream model is used here so the Dream path (family-default decoder, ChatML
template, shifted logits) is served end to end as well.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.tiny_models import make_tiny_model_dir
from tests.runtime.server_process import REPO, ServerProcess

NAME = "dream"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllm_runtime", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_missing_model_folder_exits_with_a_clear_message(tmp_path):
    result = run_cli("--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "--model" in result.stderr and "not a folder" in result.stderr


def test_invalid_env_value_names_the_variable():
    result = run_cli(env={"DLLM_PORT": "eighty"})
    assert result.returncode == 2 and "DLLM_PORT" in result.stderr


def test_invalid_decoding_default_names_the_flag(tmp_path):
    make_tiny_model_dir(tmp_path, arch="llada")
    result = run_cli("--model", str(tmp_path), "--threshold", "3")
    assert result.returncode == 2 and "--threshold" in result.stderr


def _fill(folder, staging) -> None:
    """Copy a model folder in, config.json last and atomically (what a copy/sidecar would do)."""
    for f in staging.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    shutil.copy(staging / "config.json", folder / "config.json.tmp")
    (folder / "config.json.tmp").rename(folder / "config.json")


def _post(server, body, timeout=120.0) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=timeout)


PLACEMENTS = pytest.mark.parametrize("placement", [[], ["--engine-process"]], ids=["engine-thread", "engine-process"])


@PLACEMENTS
def test_readiness_queue_limit_and_sigterm_drain(tmp_path, placement):
    folder, staging = tmp_path / "model", tmp_path / "staging"
    folder.mkdir()
    make_tiny_model_dir(staging, arch="dream")
    server = ServerProcess("--model", str(folder), "--model-wait-timeout", "300", "--served-model-name", NAME,
                           "--max-num-seqs", "1", "--max-waiting", "1", "--grace-period", "60",
                           "--retry-after", "3", *placement, log_path=tmp_path / "server.log")
    try:
        # ---- HTTP is up, the model is not: every readiness path says 503, liveness says 200
        server.wait_live()
        r = httpx.get(server.base_url + f"/v1/models/{NAME}")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert httpx.get(server.base_url + f"/v2/models/{NAME}/ready").status_code == 503
        card = httpx.get(server.base_url + "/v1/models").json()["data"][0]
        assert card["id"] == NAME and card["max_model_len"] is None  # unknown until loaded, not a bogus 0
        assert httpx.get(server.base_url + "/health").status_code == 200  # alive: a liveness probe must not kill it
        r = _post(server, {"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert r.headers["Retry-After"] == "3"

        _fill(folder, staging)
        server.wait_ready(NAME)
        assert httpx.get(server.base_url + f"/v1/models/{NAME}").json()["ready"] is True
        assert httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"] > 0
        chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"

        # ---- one running + one waiting fill the engine: the next request is a 429 with Retry-After
        long = {"prompt": "tell me a story", "max_tokens": 24, "steps": 24}
        results: dict[str, httpx.Response] = {}

        def send(key: str) -> None:
            results[key] = _post(server, long)

        running = threading.Thread(target=send, args=("running",))
        running.start()
        server.wait_metric("vllm:num_requests_running", lambda v: v == 1)
        # n=2 with one queue place: choice 0 queues, choice 1 is refused, and choice 0 must not stay behind
        r = _post(server, {"prompt": "two please", "max_tokens": 2, "n": 2})
        assert r.status_code == 429, r.text
        server.wait_metric("vllm:num_requests_waiting", lambda v: v == 0)
        waiting = threading.Thread(target=send, args=("waiting",))
        waiting.start()
        server.wait_metric("vllm:num_requests_waiting", lambda v: v == 1)
        r = _post(server, {"prompt": "one more", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["Retry-After"] == "3"
        assert server.metric("dllm:request_errors_total", reason="queue_full") == 2

        # ---- SIGTERM: stop admitting (503), let both in-flight requests finish, exit 0
        server.proc.send_signal(15)
        deadline = time.monotonic() + 30
        while httpx.get(server.base_url + f"/v2/models/{NAME}/ready").status_code != 503:
            assert time.monotonic() < deadline, "readiness did not drop after SIGTERM"
            time.sleep(0.05)
        r = _post(server, {"prompt": "too late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.base_url + f"/v1/models/{NAME}").status_code == 503
        assert httpx.get(server.base_url + "/").status_code == 200  # liveness holds while draining
        running.join(120)
        waiting.join(120)
        for key in ("running", "waiting"):
            assert results[key].status_code == 200, results[key].text
            assert results[key].json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.proc.wait(60) == 0
        assert "draining" in server.log()
    finally:
        server.terminate()


def test_sigterm_while_loading_exits_promptly(tmp_path):
    """A rollout that stops a pod still waiting for (or loading) its weights must not hang until the
    load would have finished: the load is abandoned and the process exits 0."""
    folder = tmp_path / "empty"
    folder.mkdir()
    server = ServerProcess("--model", str(folder), "--model-wait-timeout", "600", "--served-model-name", "m",
                           log_path=tmp_path / "server.log")
    try:
        server.wait_live()
        assert httpx.get(server.base_url + "/v1/models/m").status_code == 503
        started = time.monotonic()
        server.proc.send_signal(15)
        assert server.proc.wait(30) == 0, server.log()[-2000:]
        assert time.monotonic() - started < 30
        assert "not starting the engine" in server.log()
    finally:
        server.terminate()


@PLACEMENTS
def test_model_that_fails_to_load_exits_1_with_the_reason(tmp_path, placement):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    from tests.runtime.server_process import free_port

    result = run_cli("--model", str(tmp_path), "--port", str(free_port()), "--host", "127.0.0.1", *placement)
    assert result.returncode == 1
    assert "failed to load model" in result.stderr and "safetensors" in result.stderr  # the reason, not a traceback


# ------------------------------------------------------------------------------ --engine-process


def _engine_child(server: ServerProcess) -> int:
    """The pid of the server's engine process (its multiprocessing "spawn" child)."""
    pid = server.proc.pid
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    engines = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, (children, engines)
    return engines[0]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie has exited; its parent (the server) has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.1)
    return False


LONG = {"model": "m", "prompt": "a long story", "max_tokens": 160, "algorithm": "llada", "steps": 160,
        "block_length": 1, "stream": True}


def test_engine_process_crash_fails_requests_and_liveness(tiny_llada_dir, tmp_path):
    """The engine process dies mid-request (OOM killer, a segfault in a kernel): the streaming client
    gets an error event, not a hang; liveness and readiness say so (503), so Kubernetes restarts the
    pod; new requests are refused with 503; the server still shuts down cleanly on SIGTERM."""
    server = ServerProcess("--model", str(tiny_llada_dir), "--served-model-name", "m", "--engine-process",
                           log_path=tmp_path / "server.log")
    try:
        server.wait_ready("m")
        assert httpx.get(server.base_url + "/health").status_code == 200
        with httpx.stream("POST", server.base_url + "/v1/completions", json=LONG, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # decoding
            os.kill(_engine_child(server), signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "engine_error", events[-1]
        assert "exited unexpectedly" in events[-1]["error"]["message"]
        health = httpx.get(server.base_url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_not_running"
        assert httpx.get(server.base_url + "/v2/models/m/ready").status_code == 503
        status = httpx.get(server.base_url + "/v1/models/m")
        assert status.status_code == 503 and "engine not running" in status.json()["error"]["message"]
        refused = _post(server, {"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503, refused.text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()[-3000:]
    finally:
        server.terminate()


def test_engine_process_ends_with_the_server(tiny_llada_dir, tmp_path):
    """No orphan holding the GPU: a SIGTERM stops the engine process with the server, and so does a
    SIGKILL of the server (the engine sees its pipe close)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        server = ServerProcess("--model", str(tiny_llada_dir), "--served-model-name", "m", "--engine-process",
                               log_path=tmp_path / f"server-{sig.name}.log")
        try:
            server.wait_ready("m")
            child = _engine_child(server)
            server.proc.send_signal(sig)
            server.proc.wait(60)
            assert _gone(child, 30), f"engine process {child} outlived the server ({sig.name})"
        finally:
            server.terminate()
