#!/usr/bin/env python3
"""GSM8K / HumanEval accuracy of a model served behind any OpenAI-compatible API.

    python bench/accuracy.py --base-url http://127.0.0.1:8080/v1 --model dllm-demo --task gsm8k --limit 50
    python bench/accuracy.py --base-url ... --model ... --task humaneval --limit 20 --execute

GSM8K goes through chat/completions (the model's chat template) zero-shot and is scored by the last
number in the answer against the reference after `####` (the usual lm-eval "flexible extract").
HumanEval goes through completions with the function prompt and is scored pass@1 by running the
problem's tests on prompt + completion in a subprocess with a timeout. That executes model-written
code, so it only runs with `--execute` (use a throwaway container). Data: data/ (copied in the repo).
Diffusion settings go in `--extra-body` (e.g. '{"steps": 256, "block_length": 32}').
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "data"
GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer as a number after '####'.\n\n"
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_problems(limit: int) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (DATA / "gsm8k_test.jsonl").read_text().splitlines() if x.strip()]
    return [{"id": f"gsm8k/{i}", "question": r["question"], "gold": r["answer"].split("####")[-1].strip()}
            for i, r in enumerate(rows[:limit])]


def humaneval_problems(limit: int) -> list[dict[str, Any]]:
    with gzip.open(DATA / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(x) for x in f if x.strip()]
    return rows[:limit]


def normalize_number(text: str) -> str | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def extract_answer(completion: str) -> str | None:
    """The number after the last '####', else the last number in the text."""
    tail = completion.split("####")[-1] if "####" in completion else completion
    numbers = _NUMBER.findall(tail) or _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def truncate_code(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def run_humaneval_test(problem: dict[str, Any], completion: str, timeout: float) -> bool:
    program = problem["prompt"] + truncate_code(completion) + "\n\n" + problem["test"] + \
        f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        try:
            result = subprocess.run([sys.executable, str(path)], cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 0


async def ask(client, args: argparse.Namespace, problem: dict[str, Any]) -> str:
    extra = json.loads(args.extra_body)
    if args.task == "gsm8k":
        body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": GSM8K_INSTRUCTION + problem["question"]}], **extra}
        r = await client.post("/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0.0, "prompt": problem["prompt"],
            **extra}
    r = await client.post("/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    problems = gsm8k_problems(args.limit) if args.task == "gsm8k" else humaneval_problems(args.limit)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.concurrency)
    records: list[dict[str, Any]] = []

    async def one(client, problem: dict[str, Any]) -> None:
        async with sem:
            try:
                completion, error = await ask(client, args, problem), None
            except Exception as exc:  # count as wrong, keep going
                completion, error = "", f"{type(exc).__name__}: {exc}"
        if args.task == "gsm8k":
            predicted = extract_answer(completion)
            correct = predicted is not None and predicted == normalize_number(problem["gold"])
            records.append({"id": problem["id"], "correct": correct, "predicted": predicted, "gold": problem["gold"],
                            "error": error})
        else:
            correct = error is None and await asyncio.to_thread(run_humaneval_test, problem, completion, args.exec_timeout)
            records.append({"id": problem["task_id"], "correct": correct, "error": error})

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, timeout=args.timeout) as client:
        await asyncio.gather(*(one(client, p) for p in problems))
    correct = sum(r["correct"] for r in records)
    return {"task": args.task, "model": args.model, "n": len(records), "correct": correct,
            "accuracy": round(correct / len(records), 4) if records else None,
            "errors": sum(r["error"] is not None for r in records), "wall_s": round(time.perf_counter() - start, 1),
            "records": sorted(records, key=lambda r: r["id"]) if args.details else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--model", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--task", choices=("gsm8k", "humaneval"), default="gsm8k")
    p.add_argument("--limit", type=int, default=50, help="first N problems")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--extra-body", default="{}", help="JSON merged into each request (diffusion settings)")
    p.add_argument("--execute", action="store_true", help="HumanEval: allow running model-written code")
    p.add_argument("--exec-timeout", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--details", action="store_true", help="include per-problem records in the JSON")
    args = p.parse_args(argv)
    if args.task == "humaneval" and not args.execute:
        p.error("humaneval runs model-generated code: pass --execute (in a sandbox) to allow it")
    if args.limit < 1:
        p.error("--limit must be >= 1")
    summary = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in summary.items() if v is not None}))
    print(f"{summary['task']}: {summary['correct']}/{summary['n']} = {summary['accuracy']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
