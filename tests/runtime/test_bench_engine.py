"""bench/engine.py stays runnable and reports what its workload did (no timing asserted).

The bench drives the real `AsyncEngine`; at concurrency 2 requests must share forwards, and since
decoding is greedy and batch-invariant, every level must produce the same answers' lengths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_engine_runs_levels_rounds_and_the_nfe_table(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--concurrency", "1,2", "--requests", "4",
         "--rounds", "2", "--nfe-requests", "1", "--algorithm", "fast_dllm", "--no-stream", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    c1, c2 = result["levels"]
    assert (c1["concurrency"], c2["concurrency"]) == (1, 2)
    assert c1["requests"] == c2["requests"] == 4
    assert c1["mean_batch"] == 1 and c2["mean_batch"] > 1  # continuous batching shared the forwards
    assert c1["mean_tokens"] == c2["mean_tokens"] > 0 and c1["mean_nfe"] == c2["mean_nfe"]  # batch-invariant
    assert len(result["round_ratios"]) == 2 and result["ratio"] > 0
    nfe = {row["policy"]: row for row in result["nfe"]}
    assert nfe["llada low_confidence steps=gen"]["mean_nfe"] <= 32  # steps = max_tokens, fewer after an early stop
    dual, none = nfe["fast_dllm threshold 0.9, dual cache"], nfe["fast_dllm threshold 0.9, no cache"]
    assert dual["computed_per_forward"] < none["computed_per_forward"]  # the cache's point: fewer tokens per forward
    assert "dream entropy steps=gen" in nfe  # the golden tiny Dream rows
