"""Run the real `dllm-serve serve` (`python -m dllm_runtime`) as a subprocess on a loopback port.

The server tests talk to it over real HTTP with httpx and the real `openai` client; nothing in the
server is mocked. `OMP_NUM_THREADS=1` keeps a server from fighting the test client for the CPU.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server process; `base_url` is `http://127.0.0.1:<port>`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [sys.executable, "-m", "dllm_runtime", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_live(self, timeout: float = 120.0) -> None:
        """Until `/` answers (HTTP is up; the model may still be loading)."""
        self._wait(lambda r: r.status_code == 200, "/", timeout)

    def wait_ready(self, name: str, timeout: float = 180.0) -> None:
        self._wait(lambda r: r.status_code == 200, f"/v2/models/{name}/ready", timeout)

    def _wait(self, ok, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if ok(httpx.get(self.base_url + path, timeout=2.0)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not OK after {timeout}s:\n{self.log()[-4000:]}")

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {series: value} (series = name + labels as printed)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the series of `name` whose labels include `labels`."""
        total = 0.0
        for series, value in self.metrics().items():
            m = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", series)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def wait_metric(self, name: str, predicate, timeout: float = 30.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        value = self.metric(name, **labels)
        while not predicate(value):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} stuck at {value}")
            time.sleep(0.1)
            value = self.metric(name, **labels)
        return value

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode
