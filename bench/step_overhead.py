"""What one more sequence adds to a step's host work: the step loop's per-sequence cost, measured.

Not a test: it measures. Continuous batching gains little when each sequence in the batch costs
the step loop nearly as much as its share of the forward; this shows that share. `run_step` and
the engine's read of the generation slots (`generation_ids`) run real decoding policies on real
sequences of GSM8K prompts, but the model call is a stand-in that returns logits for the requested
positions at almost no cost, so what is timed is host work: planning, laying out the call, the
logits index, commits, reads. CPU time per step at batch 1 and batch N (the minimum over
`--repeats` runs: on a shared machine noise only adds), and the difference per extra sequence.

    python bench/step_overhead.py                      # LLaDA, batch 1 and 16
    python bench/step_overhead.py --algorithm fast_dllm --batch 32

Compare a change side by side (old and new tree in one session); absolute numbers depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT))

from dllm_runtime.decoding.base import RandomSource, Sequence, generation_ids  # noqa: E402
from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.decoding.registry import build_policy  # noqa: E402
from dllm_runtime.engine.step import run_step  # noqa: E402
from dllm_runtime.models import load_model_files  # noqa: E402
from dllm_runtime.models.base import SpecialIds  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
SPECIAL = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)  # the golden tiny ids


class StandInModel(torch.nn.Module):
    """The golden tiny LLaDA's interface with a near-free forward: fixed random logits, shifted by the
    input ids so that decoding still depends on the canvas."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.special_ids, self.num_layers = model.special_ids, model.num_layers
        self.position_ids = model.position_ids
        self.table = torch.randn(8192, model.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, attention: object = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        flat = ids.reshape(-1)
        if logits_index is not None:
            flat = flat[logits_index]
        logits = self.table[: flat.numel()] + 1e-3 * flat[:, None]
        return logits if logits_index is not None else logits.view(*ids.shape, -1)


def sequences(model: torch.nn.Module, prompts: list[list[int]], args: argparse.Namespace) -> list:
    out = []
    for i, prompt in enumerate(prompts):
        params = DecodingParams(algorithm=args.algorithm, max_tokens=args.max_tokens, block_length=args.block_length, seed=i)
        canvas = torch.tensor([prompt + [SPECIAL.mask] * params.generation_slots()])
        seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=SPECIAL, rng=RandomSource(i))
        policy = build_policy(params, model)
        policy.init(seq)
        out.append((seq, policy))
    return out


def host_us_per_step(model: torch.nn.Module, prompts: list[list[int]], args: argparse.Namespace) -> float:
    """CPU microseconds per step, decoding `prompts` together to the end (min over `--repeats`)."""
    runs = []
    for _ in range(args.repeats):
        work, spent, steps = sequences(model, prompts, args), 0.0, 0
        seqs = [seq for seq, _ in work]
        while not all(seq.finished for seq in seqs):
            start = time.process_time()
            run_step(model, work, min_tokens=4)
            generation_ids(seqs)
            spent, steps = spent + time.process_time() - start, steps + 1
        runs.append(1e6 * spent / steps)
    return min(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="llada")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    real = load_model_files(GOLDEN / "llada_tiny_config.json", [GOLDEN / "llada_tiny.safetensors"], device="cpu",
                            special_ids=SPECIAL)
    model = StandInModel(real)
    with (ROOT / "data" / "gsm8k_test.jsonl").open(encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(args.batch))]
    prompts = [list(q.encode("ascii", "ignore")[: args.prompt_bytes]) for q in questions]  # the byte tokenizer's ids
    host_us_per_step(model, prompts, argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up
    one = host_us_per_step(model, prompts[:1], args)
    many = host_us_per_step(model, prompts, args)
    per_extra = (many - one) / (args.batch - 1) if args.batch > 1 else 0.0
    print(f"host us per step ({args.algorithm}, stand-in forward, CPU, min of {args.repeats}): batch 1 {one:.0f}, "
          f"batch {args.batch} {many:.0f}; per extra sequence {per_extra:.1f}")
    if args.json:
        result = {"algorithm": args.algorithm, "batch": args.batch, "batch1_us": one, "batchN_us": many,
                  "per_extra_sequence_us": per_extra}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
