"""bench/gpu_forward.py stays runnable and measures what it claims (no timing asserted).

The tiny CPU preset runs in-process through the same code the GPU run uses: the serving path's
Fast-dLLM with a fixed quota must take exactly block_length / quota forwards per block in every
cache mode (the dual cache's bound is the same steps_per_block), every canvas must be fully decoded,
and without a GPU there is no bandwidth floor to report.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GEN, BLOCK, QUOTA, PROMPT = 32, 16, 8, 32


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    """The script as a module (bench/ is not a package); torch's thread count restored afterwards."""
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("bench_gpu_forward", ROOT / "bench" / "gpu_forward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop(spec.name, None)


def test_tiny_cpu_run_decodes_every_config_at_the_fixed_quota(bench: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_forward.json"
    rc = bench.main([
        "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--threads", "1",
        "--prompt-len", str(PROMPT), "--gen-len", str(GEN), "--block-length", str(BLOCK), "--quota", str(QUOTA),
        "--batch-sizes", "1,2", "--caches", "none,prefix,dual", "--warmup", "1", "--repeats", "2",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["batch"], r["cache"]): r for r in result["rows"]}
    assert set(rows) == {(b, c) for b in (1, 2) for c in ("none", "prefix", "dual")}

    per_block = BLOCK // QUOTA
    for (batch, cache), r in rows.items():
        # every sequence takes exactly steps_per_block forwards per block, in lockstep with the batch
        assert r["nfe_min"] == r["nfe_max"] == r["forwards"] == GEN // QUOTA == (GEN // BLOCK) * per_block, (batch, cache)
        assert r["masks_left"] == 0, (batch, cache)
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["forwards_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(batch * GEN / r["wall_s"])
        assert r["ms_per_forward"] == pytest.approx(1000 * r["wall_s"] / r["forwards"])
        assert 0 < r["model_ms_per_forward"] < r["ms_per_forward"]  # the model call is timed inside the step
        assert r["host_ms_per_forward"] == pytest.approx(r["ms_per_forward"] - r["model_ms_per_forward"])
        assert r["floor_ms"] is None and r["vs_floor"] is None and r["peak_mem_gib"] is None  # CPU: no floor

    meta = result["meta"]
    assert meta["hbm_gbps"] is None and 0 < meta["streamed_bytes"] < meta["weight_bytes"]
    bare = result["bare_forward"]
    assert bare["tokens"] == PROMPT + GEN and bare["ms"] > 0 and bare["tflops"] > 0

    table = capsys.readouterr().out
    assert table.count("\n| ") == 1 + len(rows)  # header + one line per configuration
    assert "bare batch-1 forward" in table


def test_prompt_spread_gives_every_row_its_own_length(bench: ModuleType, tmp_path: Path) -> None:
    """Distinct prompt lengths (the serving case: packed rows, varlen attention on a GPU) decode in the
    same number of forwards, cache or not."""
    assert bench.prompt_lengths(32, 12, 4) == [32, 28, 24, 20]
    assert bench.prompt_lengths(32, 12, 1) == [32]
    out = tmp_path / "spread.json"
    rc = bench.main([
        "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--threads", "1",
        "--prompt-len", str(PROMPT), "--prompt-spread", "12", "--gen-len", str(GEN), "--block-length", str(BLOCK),
        "--quota", str(QUOTA), "--batch-sizes", "3", "--caches", "none,dual", "--warmup", "0", "--repeats", "1",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["meta"]["prompt_spread"] == 12
    for r in result["rows"]:
        assert r["forwards"] == r["nfe_max"] == GEN // QUOTA and r["masks_left"] == 0, r["cache"]


def test_8b_preset_has_llada_8b_shapes_and_a_bandwidth_floor(bench: ModuleType) -> None:
    """Built on the meta device (no memory): parameter count and the bytes the floor divides."""
    model = bench.build_model("8b", torch.device("meta"), torch.bfloat16, seed=0)
    total, streamed = bench.weight_bytes(model)
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184  # LLaDA-8B's released tensor shapes
    assert total == 2 * 8_015_581_184 and total - streamed == 2 * 126464 * 4096  # the embedding is gathered
    assert bench.hbm_gbps(torch.device("cpu"), None) is None
    assert bench.hbm_gbps(torch.device("cpu"), 4800.0) == 4800.0


def test_arguments_that_break_the_fixed_quota_are_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--gen-len", "32", "--block-length", "16", "--quota", "5"])
