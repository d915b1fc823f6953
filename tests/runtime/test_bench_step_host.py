"""bench/step_host.py stays runnable (no timing asserted): every cache mode and batch size gets a row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_step_host_bench_reports_every_cache_mode_and_batch(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step_host.py"), "--layers", "2", "--batch-sizes", "1,3",
         "--repeats", "1", "--steps", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["cache"], r["batch"]) for r in rows] == [(c, b) for c in ("none", "prefix", "dual") for b in (1, 3)]
    assert all(r["first_ms"] > 0 and r["later_ms"] > 0 for r in rows)
