#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (dllm-serve, vLLM, ...), plus an in-process
engine mode that runs the *same* workload straight on `AsyncEngine`, so the HTTP layer's cost is
measured rather than guessed (`overhead = server tok/s / engine tok/s` at equal concurrency).

    python bench/serve.py --base-url http://127.0.0.1:8080/v1 --model dllm-demo \
        --concurrency 8 --requests 64 --max-tokens 32 --stream
    python bench/serve.py --engine-model /path/to/model --concurrency 8 --requests 64 --max-tokens 32

Prompts are GSM8K questions from data/ (deterministic order). Output: a human summary on stderr and
one JSON object on stdout (req/s, output tok/s, TTFT and end-to-end p50/p99, forwards per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data" / "gsm8k_test.jsonl"


@dataclass
class Result:
    ok: bool
    e2e_s: float
    ttft_s: float | None
    completion_tokens: int
    forwards: int
    error: str | None = None


def load_prompts(n: int, path: Path = DATA) -> list[str]:
    questions = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    return [questions[i % len(questions)] for i in range(n)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------------------------- HTTP client


async def http_one(client, args: argparse.Namespace, prompt: str) -> Result:
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            **json.loads(args.extra_body)}
    if args.chat:
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/completions", prompt
    start = time.perf_counter()
    try:
        if not args.stream:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return Result(False, time.perf_counter() - start, None, 0, 0, f"{r.status_code}: {r.text[:200]}")
            usage = r.json().get("usage") or {}
            e2e = time.perf_counter() - start
            return Result(True, e2e, e2e, usage.get("completion_tokens", 0),
                          (usage.get("diffusion") or {}).get("forwards", 0))
        body["stream"], body["stream_options"] = True, {"include_usage": True}
        ttft, usage = None, {}
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Result(False, time.perf_counter() - start, None, 0, 0, f"{r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    piece = c.get("text") or (c.get("delta") or {}).get("content")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - start
        return Result(True, time.perf_counter() - start, ttft, usage.get("completion_tokens", 0),
                      (usage.get("diffusion") or {}).get("forwards", 0))
    except Exception as exc:  # a benchmark reports failures instead of dying on the first one
        return Result(False, time.perf_counter() - start, None, 0, 0, f"{type(exc).__name__}: {exc}")


async def run_http(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Result], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        return await run_pool(args.concurrency, prompts, lambda p: http_one(client, args, p))


# ---------------------------------------------------------------------------------- in-process engine


async def run_engine(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Result], float]:
    """The same workload on `AsyncEngine` directly (no HTTP, no JSON, no SSE)."""
    from dllm_runtime.decoding.params import DecodingParams
    from dllm_runtime.engine.config import EngineConfig
    from dllm_runtime.engine.engine import AsyncEngine
    from dllm_runtime.engine.request import GenerationRequest
    from dllm_runtime.models import load_model
    from dllm_runtime.tokenizer import apply_chat_template, load_tokenizer

    model = load_model(args.engine_model, device=args.device)
    tokenizer = load_tokenizer(args.engine_model)
    engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=args.max_num_seqs))
    engine.start()
    extra = json.loads(args.extra_body)
    if "algorithm" not in extra and model.model_type.lower() == "dream":
        extra["algorithm"] = "dream"  # what the server picks for the Dream family
    params = DecodingParams.from_dict({**extra, "max_tokens": args.max_tokens, "temperature": args.temperature})
    counter = iter(range(10**9))

    async def one(prompt: str) -> Result:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}]) if args.chat \
            else list(tokenizer(prompt)["input_ids"])
        start, ttft, last = time.perf_counter(), None, None
        async for out in engine.generate(GenerationRequest(f"bench-{next(counter)}", ids, params)):
            if out.text_delta and ttft is None:
                ttft = time.perf_counter() - start
            last = out
        ok = last is not None and last.finish_reason in ("stop", "length")
        return Result(ok, time.perf_counter() - start, ttft, last.completion_tokens if last else 0,
                      last.nfe if last else 0, None if ok else (last.error if last else "no output"))

    try:
        if args.warmup:  # same warm-up as the HTTP mode gets, on this engine instance
            await run_pool(1, load_prompts(args.warmup), one)
        return await run_pool(args.concurrency, prompts, one)
    finally:
        await engine.shutdown(timeout=5)


# ---------------------------------------------------------------------------------- common


async def run_pool(concurrency: int, prompts: list[str], one) -> tuple[list[Result], float]:
    """`concurrency` workers pull prompts until none are left (a closed-loop load)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def summarize(results: list[Result], wall_s: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    forwards = sum(r.forwards for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "mode": "engine" if args.engine_model else "http",
        "concurrency": args.concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), None),
        "max_tokens": args.max_tokens,
        "stream": bool(args.stream),
        "wall_s": round(wall_s, 3),
        "req_per_s": round(len(ok) / wall_s, 3),
        "output_tok_per_s": round(tokens / wall_s, 2),
        "ttft_ms_p50": ms(percentile(ttfts, 50)),
        "ttft_ms_p99": ms(percentile(ttfts, 99)),
        "e2e_ms_p50": ms(percentile(e2es, 50)),
        "e2e_ms_p99": ms(percentile(e2es, 99)),
        "e2e_ms_mean": ms(statistics.fmean(e2es)) if e2es else None,
        "forwards_per_request": round(forwards / len(ok), 2) if ok else None,
        "tokens_per_forward": round(tokens / forwards, 3) if forwards else None,
    }


def scrape_e2e(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of `vllm:e2e_request_latency_seconds` on a dllm-serve/vLLM /metrics page."""
    import httpx

    total = count = 0.0
    for line in httpx.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith("vllm:e2e_request_latency_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:e2e_request_latency_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="OpenAI base URL (ends in /v1)")
    p.add_argument("--model", default=None, help="`model` field sent (the served model name)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--engine-model", default=None, help="model folder: run the workload on AsyncEngine in-process")
    p.add_argument("--device", default="cpu", help="device for --engine-model")
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine batch slots for --engine-model")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true", help="use chat/completions (the chat template) instead of completions")
    p.add_argument("--extra-body", default="{}", help='JSON merged into each request, e.g. \'{"steps": 16}\'')
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before the run")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--metrics-url", default=None, help="the server's /metrics: also report the HTTP layer's "
                   "latency (client e2e minus the engine's own e2e histogram over the same requests)")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be >= 1")
    prompts = load_prompts(args.requests + args.warmup)[args.warmup:]

    async def go() -> tuple[list[Result], float]:
        if args.engine_model:
            return await run_engine(args, prompts)
        return await run_http(args, prompts)

    if args.warmup and not args.engine_model:
        asyncio.run(run_http(argparse.Namespace(**{**vars(args), "concurrency": 1}), load_prompts(args.warmup)))
    before = scrape_e2e(args.metrics_url) if args.metrics_url else None
    results, wall = asyncio.run(go())
    summary = summarize(results, wall, args)
    if before is not None:
        after = scrape_e2e(args.metrics_url)
        n = after[1] - before[1]
        if n and summary["e2e_ms_mean"] is not None:
            engine_mean_ms = (after[0] - before[0]) / n * 1000
            summary["engine_e2e_ms_mean"] = round(engine_mean_ms, 1)
            summary["http_overhead_ms_mean"] = round(summary["e2e_ms_mean"] - engine_mean_ms, 1)
    print(json.dumps(summary))
    print(f"{summary['mode']}: c={args.concurrency} {summary['req_per_s']} req/s, {summary['output_tok_per_s']} tok/s, "
          f"TTFT p50/p99 {summary['ttft_ms_p50']}/{summary['ttft_ms_p99']} ms, e2e p50/p99 "
          f"{summary['e2e_ms_p50']}/{summary['e2e_ms_p99']} ms, failed {summary['failed']}"
          + (f", HTTP layer {summary['http_overhead_ms_mean']} ms/request" if "http_overhead_ms_mean" in summary else ""),
          file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
