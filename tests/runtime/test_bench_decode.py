"""bench/decode.py stays runnable and measures what the golden vectors say (no timing asserted).

On the golden tiny models with the golden prompt, the bench's NFE for a decoder must equal the NFE
the reference recorded for the same settings: the benchmark drives the serving path, so this also
checks that `DecodingParams` -> `build_policy` reproduces the reference decoders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_rows_reproduce_golden_nfe() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "decode.py"), "--tiny", "--gen-length", "32", "--block-length", "8",
         "--prompts", "1", "--warmup", "0", "--json",
         "--only", "fast_dllm threshold 0.9", "--only", "d3llm multi-block", "--only", "d3llm sequential"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["decoder"]: r for r in map(json.loads, proc.stdout.splitlines())}
    # golden: fastdllm_threshold0.9_t0 (14), d3llm_llada_multiblock_ent0.5_earlystop_t0 (5),
    # d3llm_llada_multiblock_sequential_ent0.5_t0 (15)
    assert rows["fast_dllm threshold 0.9"]["nfe"] == 14
    assert rows["d3llm multi-block ent 0.5"]["nfe"] == 5
    assert rows["d3llm sequential ent 0.5"]["nfe"] == 15
    for r in rows.values():
        assert r["slots_per_forward"] == 32 / r["nfe"] and r["ms_per_request"] > 0
