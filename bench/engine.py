"""Engine throughput under concurrency: continuous batching at step granularity, one table.

Not a test: it measures. For each concurrency level the same closed-loop workload (N requests,
at most C in flight, a new one submitted as soon as one finishes) runs through `AsyncEngine`
(worker thread, real policies, real step loop), and the aggregate answer tokens/s and requests/s
are reported with the speed-up over concurrency 1. A second table gives NFE and tokens per forward
per decoding policy / cache mode (requests alone: these are properties of the decoder and model),
with the tokens the model computes per forward (what a KV cache saves).

    python bench/engine.py                                     # golden tiny LLaDA, byte tokenizer
    python bench/engine.py --model /path/to/model-folder --max-tokens 64 --block-length 32
    python bench/engine.py --concurrency 1,4,16 --requests 48 --algorithm fast_dllm --json out.json
    python bench/engine.py --algorithm fast_dllm --cache dual   # the throughput runs with a block KV cache
    python bench/engine.py --tiny-width 16 --tiny-layers 1   # near-free forwards: engine overhead shows

Prompts are GSM8K questions (data/gsm8k_test.jsonl), truncated to `--prompt-bytes`, so prompt
lengths differ between requests as they do in serving. Requests stream (every step's new text is
handed to the event loop, as streaming clients get it); `--no-stream` makes them non-streaming, one
output each, like `stream: false` API calls. On CPU keep `--threads` at what the
machine really has free; the numbers are wall-clock and depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT))

from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.engine import AsyncEngine, EngineConfig, GenerationRequest, StepStats  # noqa: E402
from dllm_runtime.models import load_model, load_model_files  # noqa: E402
from dllm_runtime.models.base import SpecialIds  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"

#: decoding policy / cache mode rows of the NFE table (LLaDA-family model)
NFE_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("llada low_confidence steps=gen", {"algorithm": "llada", "steps": None}),
    ("fast_dllm threshold 0.9, no cache", {"algorithm": "fast_dllm", "threshold": 0.9}),
    ("fast_dllm threshold 0.9, prefix cache", {"algorithm": "fast_dllm", "threshold": 0.9, "cache": "prefix"}),
    ("fast_dllm threshold 0.9, dual cache", {"algorithm": "fast_dllm", "threshold": 0.9, "cache": "dual"}),
    ("fast_dllm factor 1.0", {"algorithm": "fast_dllm", "factor": 1.0}),
    ("d3llm threshold 0.5 multi-block", {"algorithm": "d3llm", "threshold": 0.5}),
    ("d3llm threshold 0.5, delayed prefix cache", {"algorithm": "d3llm", "threshold": 0.5, "cache": "prefix"}),
]
#: rows for a Dream-family model (right-shifted logits)
DREAM_NFE_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("dream entropy steps=gen", {"algorithm": "dream", "alg": "entropy"}),
    ("dream maskgit_plus steps=gen", {"algorithm": "dream", "alg": "maskgit_plus"}),
    ("dream topk_margin steps=gen/2", {"algorithm": "dream", "alg": "topk_margin", "steps": "half"}),
    ("dream origin T=0.5 steps=gen", {"algorithm": "dream", "alg": "origin", "temperature": 0.5}),
    ("d3llm (Dream) threshold 0.5 multi-block", {"algorithm": "d3llm", "threshold": 0.5}),
    ("d3llm (Dream) 0.5, delayed prefix cache", {"algorithm": "d3llm", "threshold": 0.5, "cache": "prefix"}),
]


class StepCounter:
    """EngineObserver: sizes of the forwards (called from the engine's worker thread)."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.forward_tokens: list[int] = []
        self.latencies: list[float] = []

    def on_step(self, stats: StepStats) -> None:
        self.batch_sizes.append(stats.batch_size)
        self.forward_tokens.append(stats.tokens_in_forward)
        self.latencies.append(stats.latency_s)

    def on_request_finished(self, stats: Any) -> None:
        pass


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    if args.model:
        from dllm_runtime.tokenizer import load_tokenizer

        return load_model(args.model, dtype=args.dtype, device=args.device), load_tokenizer(args.model), args.model
    from tests.helpers.byte_tokenizer import ByteTokenizer

    config, weights = GOLDEN / "llada_tiny_config.json", GOLDEN / "llada_tiny.safetensors"
    name = "golden llada_tiny (d=64, 2 layers, vocab 256)"
    if args.tiny_width:  # a random LLaDA of another size, same vocabulary and special ids
        from safetensors.torch import save_file

        from tests.helpers.tiny_models import tiny_state_dict

        shape = json.loads(config.read_text())
        shape.update(d_model=args.tiny_width, n_heads=2, n_kv_heads=2, mlp_hidden_size=2 * args.tiny_width, n_layers=args.tiny_layers)
        folder = Path(tempfile.mkdtemp(prefix="dllm-bench-"))
        config, weights = folder / "config.json", folder / "model.safetensors"
        config.write_text(json.dumps(shape), encoding="utf-8")
        save_file(tiny_state_dict("llada", shape), str(weights))
        name = f"random LLaDA (d={args.tiny_width}, {args.tiny_layers} layers, vocab 256)"
    special = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)  # the golden tiny ids (ALGORITHMS.md 4.2)
    model = load_model_files(config, [weights], device=args.device, special_ids=special)
    return model, ByteTokenizer(), name + " + byte tokenizer"


def prompts(tokenizer: Any, n: int, max_bytes: int) -> list[list[int]]:
    questions = []
    with (ROOT / "data" / "gsm8k_test.jsonl").open(encoding="utf-8") as f:
        for line in f:
            questions.append(json.loads(line)["question"])
            if len(questions) == n:
                break
    return [tokenizer.encode(q.encode("ascii", "ignore").decode()[:max_bytes]) for q in questions]


def base_params(args: argparse.Namespace, **overrides: Any) -> DecodingParams:
    values = dict(
        algorithm=args.algorithm, max_tokens=args.max_tokens, block_length=args.block_length, steps=args.steps,
        cache=args.cache,
    )
    values.update(overrides)
    return DecodingParams(**values)


async def run_level(model: Any, tokenizer: Any, args: argparse.Namespace, conc: int, workload: list[list[int]]) -> dict:
    counter = StepCounter()
    engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=conc, max_waiting=len(workload)), observer=counter)
    engine.start()
    sem = asyncio.Semaphore(conc)
    finals = []

    async def one(i: int, prompt: list[int]) -> None:
        async with sem:
            request = GenerationRequest(f"r{i}", prompt, base_params(args, seed=i), stream=not args.no_stream)
            async for out in engine.generate(request):
                if out.finished:
                    finals.append(out)

    start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(workload)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    await engine.shutdown(10)
    errors = [o for o in finals if o.finish_reason in ("error", "abort")]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0].error}")
    tokens = sum(o.completion_tokens for o in finals)
    return {
        "concurrency": conc,
        "requests": len(finals),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        # CPU time of the whole process (loop + worker): robust to other load on a shared machine
        "tokens_per_cpu_s": tokens / cpu,
        "requests_per_s": len(finals) / wall,
        "mean_batch": statistics.fmean(counter.batch_sizes),
        "forwards": len(counter.batch_sizes),
        "ms_per_step": 1e3 * statistics.fmean(counter.latencies),
        "mean_nfe": statistics.fmean(o.nfe for o in finals),
        "mean_tokens": tokens / len(finals),
    }


def forward_ceiling(model: Any, canvas: int, levels: list[int], repeats: int = 15) -> dict[int, float]:
    """Bare model forwards, no engine: rows per CPU-second at batch c relative to batch 1.

    The most continuous batching can gain on this machine: when forwards are compute-bound (CPU,
    any real width), c rows cost ~c times one row and no scheduler can beat that ratio. CPU time
    (median of `repeats`), not wall time: on a shared machine a long forward is preempted more
    often than a short one, which would bias wall-clock numbers against big batches. The levels
    take turns, after a few warm-up calls each: measured one level after the other, the first
    level's calls right after the engine runs came out slow (a c16 "ceiling" anywhere from 3x to 7x
    instead of a steady 4.2x on the width-16 model).
    """
    device = next(model.parameters()).device
    inputs = {}
    samples: dict[int, list[float]] = {c: [] for c in levels}
    with torch.inference_mode():
        for c in levels:
            ids = torch.randint(0, 200, (c, canvas), device=device)
            inputs[c] = ids, model.position_ids(torch.ones(c, canvas, dtype=torch.bool, device=device))
            for _ in range(3):
                model(*inputs[c])
        for _ in range(repeats):
            for c in levels:
                start = time.process_time()
                model(*inputs[c])
                samples[c].append(time.process_time() - start)
    times = {c: statistics.median(s) for c, s in samples.items()}
    return {c: c * times[levels[0]] / (levels[0] * times[c]) for c in levels}


async def nfe_table(
    model: Any, tokenizer: Any, args: argparse.Namespace, workload: list[list[int]], rows_spec: list[tuple[str, dict]]
) -> list[dict]:
    counter = StepCounter()
    engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=1), observer=counter)
    engine.start()
    rows = []
    try:
        for label, overrides in rows_spec:
            finals = []
            counter.forward_tokens.clear()
            for i, prompt in enumerate(workload):
                values = {"steps": None, "threshold": None, "cache": "none", "seed": i, **overrides}
                if values["steps"] == "half":
                    values["steps"] = max(1, args.max_tokens // 2)
                params = base_params(args, **values)
                async for out in engine.generate(GenerationRequest(f"n{i}", prompt, params)):
                    if out.finished:
                        finals.append(out)
            nfe = statistics.fmean(o.nfe for o in finals)
            tokens = statistics.fmean(o.completion_tokens for o in finals)
            computed = statistics.fmean(counter.forward_tokens)  # alone: one sequence per forward
            rows.append(
                {"policy": label, "mean_nfe": nfe, "mean_tokens": tokens, "tokens_per_forward": tokens / nfe,
                 "computed_per_forward": computed}
            )
    finally:
        await engine.shutdown(10)
    return rows


def load_dream(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """The Dream-family model for the NFE table: `--dream-model`, else the golden tiny Dream."""
    if args.dream_model:
        from dllm_runtime.tokenizer import load_tokenizer

        return load_model(args.dream_model, dtype=args.dtype, device=args.device), load_tokenizer(args.dream_model)
    if args.model:
        return None  # a real LLaDA-family run: no golden stand-in mixed into its table
    from tests.helpers.byte_tokenizer import ByteTokenizer

    special = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)
    model = load_model_files(
        GOLDEN / "dream_tiny_config.json", [GOLDEN / "dream_tiny.safetensors"], device=args.device, special_ids=special
    )
    return model, ByteTokenizer()


async def main_async(args: argparse.Namespace) -> dict:
    model, tokenizer, name = load(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    workload = prompts(tokenizer, args.requests, args.prompt_bytes)
    await run_level(model, tokenizer, args, 1, workload[: min(4, len(workload))])  # warm-up
    # every level once per round, rounds back to back: a slow spell of a shared machine hits all
    # levels alike, and the median round per level is what the table shows
    rounds = [[await run_level(model, tokenizer, args, c, workload) for c in levels] for _ in range(args.rounds)]
    results = [sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2] for runs in zip(*rounds)]
    round_ratios = sorted(r[-1]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds)
    base = results[0]["tokens_per_s"]
    print(f"\nmodel: {name}; device {args.device}, torch threads {torch.get_num_threads()}")
    print(
        f"workload: {len(workload)} GSM8K prompts (<= {args.prompt_bytes} bytes), algorithm={args.algorithm}, cache={args.cache}, "
        f"max_tokens={args.max_tokens}, block_length={args.block_length}, steps={args.steps or 'max_tokens'}, "
        f"{'non-streaming (one output each)' if args.no_stream else 'streaming'}\n"
    )
    print(
        f"{'conc':>5} {'tok/s':>9} {'req/s':>8} {'x c1':>6} {'tok/cpu-s':>10} {'x c1':>6} {'batch':>6} "
        f"{'ms/step':>8} {'nfe/req':>8} {'tok/req':>8}"
    )
    for r in results:
        r["speedup_vs_c1"] = r["tokens_per_s"] / base
        r["cpu_speedup_vs_c1"] = r["tokens_per_cpu_s"] / results[0]["tokens_per_cpu_s"]
        print(
            f"{r['concurrency']:>5} {r['tokens_per_s']:>9.1f} {r['requests_per_s']:>8.2f} {r['speedup_vs_c1']:>6.2f} "
            f"{r['tokens_per_cpu_s']:>10.1f} {r['cpu_speedup_vs_c1']:>6.2f} "
            f"{r['mean_batch']:>6.2f} {r['ms_per_step']:>8.2f} {r['mean_nfe']:>8.1f} {r['mean_tokens']:>8.1f}"
        )
    ratio = results[-1]["tokens_per_s"] / base
    cpu_ratio = results[-1]["cpu_speedup_vs_c1"]
    canvas = round(statistics.fmean(len(p) for p in workload)) + args.max_tokens
    ceiling = forward_ceiling(model, canvas, levels)
    print(
        f"\nc{levels[-1]}/c{levels[0]} aggregate throughput ratio: {ratio:.2f}x wall-clock, "
        f"{cpu_ratio:.2f}x per CPU-second (medians of {args.rounds} rounds; the rounds' own ratios "
        f"{round_ratios[0]:.2f}-{round_ratios[-1]:.2f}x)"
    )
    print(
        "bare-forward ceiling (rows per CPU-second at batch c vs batch 1, " + f"{canvas}-token rows): "
        + ", ".join(f"c{c} {x:.2f}x" for c, x in ceiling.items())
    )
    table = await nfe_table(model, tokenizer, args, workload[: args.nfe_requests], NFE_ROWS)
    dream = load_dream(args)
    if dream is not None:
        table += await nfe_table(*dream, args, workload[: args.nfe_requests], DREAM_NFE_ROWS)
    print(f"\nNFE per request ({args.nfe_requests} requests each, alone):")
    print(f"{'policy / cache':<42} {'nfe':>7} {'tokens':>7} {'tok/fwd':>8} {'rows/fwd':>9}")
    for row in table:
        print(
            f"{row['policy']:<42} {row['mean_nfe']:>7.1f} {row['mean_tokens']:>7.1f} {row['tokens_per_forward']:>8.2f}"
            f" {row['computed_per_forward']:>9.1f}"
        )
    return {"model": name, "levels": results, "ratio": ratio, "round_ratios": round_ratios, "cpu_ratio": cpu_ratio, "forward_ceiling": ceiling, "nfe": table, "args": vars(args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the golden tiny LLaDA)")
    parser.add_argument("--tiny-width", type=int, default=0, help="instead: a random tiny LLaDA of this width")
    parser.add_argument("--tiny-layers", type=int, default=1)
    parser.add_argument("--dream-model", help="Dream-family folder for the NFE table (default: golden tiny Dream)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--rounds", type=int, default=3, help="times every level runs (the median is shown)")
    parser.add_argument("--algorithm", default="llada")
    parser.add_argument("--cache", default="none", help="KV cache of the throughput runs: none, prefix, dual")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: one per generation slot")
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--nfe-requests", type=int, default=8)
    parser.add_argument("--no-stream", action="store_true",
                        help="non-streaming requests, one output each (default: every request streams its deltas)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    result = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
