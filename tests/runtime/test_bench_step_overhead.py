"""bench/step_overhead.py stays runnable (no timing asserted): it decodes to the end at both batch sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("algorithm", ["llada", "fast_dllm"])
def test_step_overhead_bench_reports_both_batch_sizes(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_overhead.py"), "--algorithm", algorithm, "--batch", "3",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["algorithm"] == algorithm and result["batch"] == 3
    assert result["batch1_us"] > 0 and result["batchN_us"] > 0
    assert "per extra sequence" in proc.stdout
