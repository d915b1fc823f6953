"""Host time of the engine's GPU code path, measured on a CPU: what the Python side of a step costs.

Not a test: it measures. On a GPU the step loop must issue a step's kernels faster than the GPU runs
them, or the GPU waits. This runs `run_step` down the GPU path (one varlen attention call per layer,
KV-cache rows gathered end to end) on the CPU, with the attention kernel replaced by a zero-cost
stand-in and a model of LLaDA-8B's depth but width 16: what is left is host work (Python, tensor-op
dispatch, the tiny model's arithmetic), per step, for Fast-dLLM at each cache mode and batch size.

    python bench/step_host.py                              # 32 layers, batch 1 and 32, none/prefix/dual
    python bench/step_host.py --layers 32 --batch-sizes 1,8,32 --cache dual

Compare a change side by side (old and new tree in one session); absolute numbers depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT))

from dllm_runtime.decoding.base import RandomSource, Sequence  # noqa: E402
from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.decoding.registry import build_policy  # noqa: E402
from dllm_runtime.engine import step  # noqa: E402
from dllm_runtime.models import attention, load_model_files  # noqa: E402
from dllm_runtime.models.base import SpecialIds  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
SPECIAL = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)  # the golden tiny ids


def deep_tiny_llada(layers: int):
    """A random LLaDA of width 16 and `layers` layers (the golden tiny vocabulary and special ids)."""
    from safetensors.torch import save_file

    from tests.helpers.tiny_models import tiny_state_dict

    shape = json.loads((GOLDEN / "llada_tiny_config.json").read_text())
    shape.update(d_model=16, n_heads=2, n_kv_heads=2, mlp_hidden_size=32, n_layers=layers)
    folder = Path(tempfile.mkdtemp(prefix="dllm-bench-"))
    (folder / "config.json").write_text(json.dumps(shape), encoding="utf-8")
    save_file(tiny_state_dict("llada", shape), str(folder / "model.safetensors"))
    return load_model_files(folder / "config.json", [folder / "model.safetensors"], device="cpu", special_ids=SPECIAL)


def use_stand_in_kernel() -> None:
    """Route attention down the varlen (GPU) path with a kernel that costs nothing."""

    def stand_in(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(q)

    attention._flash_attn_varlen_func = stand_in
    step.use_varlen = lambda q: True


def sequences(model, batch: int, cache: str, prompt_len: int, max_tokens: int, block: int):
    out = []
    for i in range(batch):
        prompt = [(7 * i + j) % 200 + 20 for j in range(prompt_len + i % 5)]  # distinct lengths: packed rows
        params = DecodingParams(algorithm="fast_dllm", max_tokens=max_tokens, block_length=block, cache=cache, seed=i)
        canvas = torch.full((1, len(prompt) + max_tokens), SPECIAL.mask, dtype=torch.long)
        canvas[0, : len(prompt)] = torch.tensor(prompt)
        seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=SPECIAL, rng=RandomSource(i))
        policy = build_policy(params, model)
        policy.init(seq)
        out.append((seq, policy))
    return out


def measure(model, args: argparse.Namespace, batch: int, cache: str) -> dict:
    """Median ms of a block's first step (full canvas, stores the cache) and of its later steps."""
    first, later = [], []
    for _ in range(args.repeats):
        work = sequences(model, batch, cache, args.prompt_len, args.max_tokens, args.block_length)
        for i in range(args.steps):
            start = time.perf_counter()
            step.run_step(model, work)
            (first if i == 0 else later).append(time.perf_counter() - start)
    return {"batch": batch, "cache": cache, "first_ms": 1e3 * statistics.median(first),
            "later_ms": 1e3 * statistics.median(later)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--cache", default="none,prefix,dual")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps measured per block (the first stores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = deep_tiny_llada(args.layers)
    use_stand_in_kernel()
    rows = []
    for cache in args.cache.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            measure(model, argparse.Namespace(**{**vars(args), "repeats": 1}), batch, cache)  # warm-up
            rows.append(measure(model, args, batch, cache))
    print(f"host ms per step, GPU code path with a zero-cost attention kernel, {args.layers} layers, width 16, CPU")
    print(f"{'cache':>7} {'batch':>6} {'first step':>11} {'later steps':>12} {'later/row':>10}")
    for r in rows:
        per_row = r["later_ms"] / r["batch"]
        print(f"{r['cache']:>7} {r['batch']:>6} {r['first_ms']:>11.2f} {r['later_ms']:>12.2f} {per_row:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
