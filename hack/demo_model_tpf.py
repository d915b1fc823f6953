#!/usr/bin/env python3
"""Tokens per forward of the demo model on GSM8K test prompts, per decoder (the model card's table).

    .venv/bin/python hack/demo_model_tpf.py --num-prompts 50 --max-tokens 256

Every prompt is the GSM8K question in the model's chat template; decoding goes through the serving
path (`registry.build_policy` + `engine.step.run_to_completion`), greedy, batch of `--batch-size`
sequences per forward (results do not depend on batch composition). Columns:

* `nfe`: mean model forwards per prompt;
* `tpf_answer`: answer tokens (up to the first EOS / <|eot_id|>, what `dllm-serve generate` prints)
  per forward, the serving-relevant number;
* `tpf_canvas`: all generation slots per forward (no early stop: EOS padding counts);
* `words_known`: share of generated alphabetic words that occur in GSM8K train (fluency proxy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from dllm_runtime.commands.generate import completion_tokens  # noqa: E402
from dllm_runtime.decoding.base import RandomSource, Sequence  # noqa: E402
from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.decoding.registry import build_policy  # noqa: E402
from dllm_runtime.engine.step import run_to_completion  # noqa: E402
from dllm_runtime.models import load_model  # noqa: E402
from dllm_runtime.tokenizer import apply_chat_template, load_tokenizer  # noqa: E402
from dllm_runtime.training.data import corpus_words, known_word_share, load_gsm8k  # noqa: E402


def decoders(max_tokens: int, block_length: int) -> dict[str, DecodingParams]:
    """The table's rows: LLaDA's reference sampler and the parallel decoders at their published settings."""
    common = dict(max_tokens=max_tokens, block_length=block_length, steps=max_tokens, temperature=0.0)
    return {
        "llada low_confidence": DecodingParams(algorithm="llada", remasking="low_confidence", **common),
        "fast_dllm threshold 0.9": DecodingParams(algorithm="fast_dllm", threshold=0.9, **common),
        "fast_dllm threshold 0.7": DecodingParams(algorithm="fast_dllm", threshold=0.7, **common),
        "d3llm multi-block entropy 0.5": DecodingParams(
            algorithm="d3llm", threshold=0.5, block_add_threshold=0.1, decoded_token_threshold=0.95, early_stop=True, **common
        ),
    }


@dataclass
class Row:
    name: str
    prompts: int
    nfe: float
    tpf_answer: float
    tpf_canvas: float
    answer_tokens: float
    words_known: float
    wall_s: float


def run_decoder(name: str, params: DecodingParams, model, tokenizer, prompts: list[list[int]], words: set[str], batch_size: int) -> tuple[Row, list[str]]:
    special = model.special_ids
    nfe = answer = canvas = 0
    known_sum, known_n = 0.0, 0
    texts: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = []
        for p in prompts[i : i + batch_size]:
            c = torch.full((1, len(p) + params.generation_slots()), special.mask, dtype=torch.long)
            c[0, : len(p)] = torch.tensor(p)
            batch.append((Sequence(canvas=c, prompt_len=len(p), special=special, rng=RandomSource(0)), build_policy(params, model)))
        run_to_completion(model, batch)
        for seq, _ in batch:
            toks, _ = completion_tokens(seq.canvas[0, seq.prompt_len :].tolist(), special, params.max_tokens)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            share, n = known_word_share(text, words)
            known_sum += share * n
            known_n += n
            nfe += seq.nfe
            answer += len(toks)
            canvas += seq.gen_length
            texts.append(text)
    n = len(prompts)
    row = Row(name, n, nfe / n, answer / nfe, canvas / nfe, answer / n, known_sum / max(1, known_n), time.perf_counter() - start)
    return row, texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in demo model)")
    p.add_argument("--data", type=Path, default=REPO / "data/gsm8k_test.jsonl")
    p.add_argument("--train-data", type=Path, default=REPO / "data/gsm8k_train.jsonl", help="for the known-word share")
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", action="append", default=None, help="run only decoders whose name contains this (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows (and sample answers) as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.model is None:
        from dllm_runtime.demo import demo_model_path

        args.model = demo_model_path()
    model = load_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    questions = load_gsm8k(args.data, args.num_prompts)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": q.question}]) for q in questions]
    words = corpus_words(load_gsm8k(args.train_data))

    rows, samples = [], {}
    for name, params in decoders(args.max_tokens, args.block_length).items():
        if args.only and not any(o in name for o in args.only):
            continue
        row, texts = run_decoder(name, params, model, tokenizer, prompts, words, args.batch_size)
        rows.append(row)
        samples[name] = texts[:3]
        print(f"{name}: nfe {row.nfe:.1f} tpf_answer {row.tpf_answer:.2f} tpf_canvas {row.tpf_canvas:.2f} ({row.wall_s:.0f}s)", file=sys.stderr, flush=True)

    print(f"\n{len(prompts)} GSM8K test prompts, max_tokens {args.max_tokens}, block {args.block_length}, greedy, {args.model}\n")
    print("| decoder | NFE / prompt | answer tokens / forward | canvas tokens / forward | answer tokens | known words |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.nfe:.1f} | {r.tpf_answer:.2f} | {r.tpf_canvas:.2f} | {r.answer_tokens:.1f} | {r.words_known:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
