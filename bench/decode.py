"""Decoder cost at batch 1: NFE, tokens per forward and wall time per request, one table.

Not a test: it measures. Every policy runs through the same step loop the server uses
(`registry.build_policy` + `engine.step.run_to_completion`), on the same prompts, so the columns
compare decoders, not code paths. NFE and tokens/forward are properties of the decoder and the model
(deterministic at temperature 0); wall time depends on the machine and its load.

    python bench/decode.py                                 # demo model (or the golden tiny LLaDA) + tiny Dream
    python bench/decode.py --model /path/LLaDA-8B-Instruct --dream-model /path/Dream-v0-Instruct-7B \\
        --device cuda --dtype bfloat16 --gen-length 256 --block-length 32 --prompts 8

Columns: `nfe` forwards per request, `tpf` answer tokens (cut at the first EOS / end of turn) per
forward, `slots/f` generation slots decided per forward (the canvas, EOS padding included),
`ms/req` and `ms/fwd` wall time. Rows whose decoder does not apply to a model are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from dllm_runtime.commands.generate import completion_tokens  # noqa: E402
from dllm_runtime.decoding.base import RandomSource, Sequence  # noqa: E402
from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.decoding.registry import build_policy  # noqa: E402
from dllm_runtime.engine.step import run_to_completion  # noqa: E402
from dllm_runtime.models import load_model, load_model_files  # noqa: E402
from dllm_runtime.models.base import DiffusionModel, SpecialIds  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
GOLDEN_SPECIAL = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)
GOLDEN_PROMPT = [248, 17, 99, 3, 42, 120, 7, 230]


@dataclass(frozen=True)
class Row:
    label: str
    family: str  # "llada" (LLaDA-family model) or "dream" (Dream model)
    params: dict[str, Any]


def rows(gen: int, block: int) -> list[Row]:
    """The decoders compared, each with the settings its authors evaluate with (scaled to `gen`)."""
    nb = gen // block
    return [
        Row("llada low-conf, steps=gen", "llada", {"algorithm": "llada", "steps": gen}),
        Row("llada low-conf, steps=gen/2", "llada", {"algorithm": "llada", "steps": max(nb, gen // 2)}),
        Row("fast_dllm threshold 0.9", "llada", {"algorithm": "fast_dllm", "threshold": 0.9, "steps": gen}),
        Row("fast_dllm factor 1.0", "llada", {"algorithm": "fast_dllm", "factor": 1.0, "threshold": None, "steps": gen}),
        Row("fast_dllm thr 0.9 + prefix cache", "llada",
            {"algorithm": "fast_dllm", "threshold": 0.9, "steps": gen, "cache": "prefix"}),
        Row("fast_dllm thr 0.9 + dual cache", "llada",
            {"algorithm": "fast_dllm", "threshold": 0.9, "steps": gen, "cache": "dual"}),
        Row("d3llm multi-block ent 0.5", "llada", {"algorithm": "d3llm", "threshold": 0.5}),
        Row("d3llm sequential ent 0.5", "llada",
            {"algorithm": "d3llm", "threshold": 0.5, "block_add_threshold": 1.0, "decoded_token_threshold": 1.0}),
        Row("dream entropy, steps=gen", "dream", {"algorithm": "dream", "alg": "entropy", "steps": gen}),
        Row("dream entropy, steps=gen/2", "dream", {"algorithm": "dream", "alg": "entropy", "steps": gen // 2}),
        Row("dream maskgit_plus, steps=gen/2", "dream", {"algorithm": "dream", "alg": "maskgit_plus", "steps": gen // 2}),
        Row("d3llm-dream multi-block ent 0.5", "dream", {"algorithm": "d3llm", "threshold": 0.5}),
    ]


def load(path: str | None, golden_name: str, dtype: str | None, device: str) -> tuple[DiffusionModel, Any]:
    """A model folder (with its tokenizer) or, without one, the golden tiny model (no tokenizer)."""
    if path:
        from dllm_runtime.tokenizer import load_tokenizer

        return load_model(path, dtype=dtype, device=device).eval(), load_tokenizer(path)
    model = load_model_files(GOLDEN / f"{golden_name}_config.json", [GOLDEN / f"{golden_name}.safetensors"],
                             dtype=dtype or "float32", device=device, special_ids=GOLDEN_SPECIAL)
    return model.eval(), None


def default_llada_path() -> str | None:
    try:
        from dllm_runtime.demo import demo_model_path

        return str(demo_model_path())
    except (ImportError, FileNotFoundError):
        return None


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """GSM8K test questions through the chat template, or the golden prompt for tokenizer-less models."""
    if tokenizer is None:
        return [GOLDEN_PROMPT] * count
    from dllm_runtime.tokenizer import apply_chat_template

    lines = (ROOT / "data" / "gsm8k_test.jsonl").read_text().splitlines()[:count]
    return [apply_chat_template(tokenizer, [{"role": "user", "content": json.loads(l)["question"]}]) for l in lines]


def measure(model: DiffusionModel, tokenizer: Any, row: Row, gen: int, block: int, prompt_ids: list[list[int]],
            device: torch.device) -> dict[str, Any]:
    params = DecodingParams(max_tokens=gen, block_length=block, seed=0).replace(**row.params).validate()
    special = model.special_ids
    nfes, answers, walls = [], [], []
    for ids in prompt_ids:
        canvas = torch.full((1, len(ids) + params.generation_slots()), special.mask, dtype=torch.long, device=device)
        canvas[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        seq = Sequence(canvas=canvas, prompt_len=len(ids), special=special, rng=RandomSource(0, device))
        policy = build_policy(params, model)
        start = time.perf_counter()
        run_to_completion(model, [(seq, policy)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - start)
        nfes.append(seq.nfe)
        answers.append(len(completion_tokens(seq.canvas[0, len(ids):].tolist(), special, gen)[0]))
    nfe = statistics.mean(nfes)
    wall = statistics.mean(walls)
    return {
        "decoder": row.label,
        "model": row.family,
        "nfe": nfe,
        "tpf": statistics.mean(a / n for a, n in zip(answers, nfes)),
        "slots_per_forward": gen / nfe,
        "ms_per_request": wall * 1e3,
        "ms_per_forward": wall * 1e3 / nfe,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="LLaDA-family folder (default: the demo model, else golden llada_tiny)")
    ap.add_argument("--dream-model", default=None, help="Dream folder (default: golden dream_tiny)")
    ap.add_argument("--tiny", action="store_true", help="use the golden tiny models even when the demo model exists")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=3, help="requests per decoder (GSM8K questions with a tokenizer)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests per model before measuring")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: keep it small)")
    ap.add_argument("--only", action="append", default=[], help="run rows whose label contains this (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per row instead of the table")
    args = ap.parse_args(argv)
    if args.gen_length % args.block_length:
        ap.error("--gen-length must be a multiple of --block-length")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    models = {
        "llada": load(args.model or (None if args.tiny else default_llada_path()), "llada_tiny", args.dtype, args.device),
        "dream": load(args.dream_model, "dream_tiny", args.dtype, args.device),
    }
    for family, (model, tok) in models.items():  # warm-up (allocator, kernels) outside the timings
        for ids in prompts(tok, args.warmup):
            measure(model, tok, rows(args.gen_length, args.block_length)[0 if family == "llada" else 8],
                    args.gen_length, args.block_length, [ids], device)

    results = []
    for row in rows(args.gen_length, args.block_length):
        if args.only and not any(s in row.label for s in args.only):
            continue
        model, tok = models[row.family]
        results.append(measure(model, tok, row, args.gen_length, args.block_length, prompts(tok, args.prompts), device))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print(f"# gen_length={args.gen_length} block_length={args.block_length} prompts={args.prompts} "
              f"device={args.device} threads={args.threads} batch=1")
        print(f"{'decoder':34} {'model':6} {'nfe':>7} {'tpf':>6} {'slots/f':>8} {'ms/req':>9} {'ms/fwd':>8}")
        for r in results:
            print(f"{r['decoder']:34} {r['model']:6} {r['nfe']:7.1f} {r['tpf']:6.2f} {r['slots_per_forward']:8.2f} "
                  f"{r['ms_per_request']:9.1f} {r['ms_per_forward']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
