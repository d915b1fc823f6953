"""`dllm-serve conformance DIR`: replay golden vectors and check token-exact agreement.

Prints one line per case (`PASS`/`FAIL`/`SKIP`) and ends with `N passed, M failed`; exits 0 only
when no case failed. See `dllm_runtime.conformance` for what is compared.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module is imported lazily by the CLI; torch only when the command runs
    from dllm_runtime.conformance import CaseResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="folder with *_golden.json, the tiny models and tensors")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="only cases whose name contains this (repeatable)",
    )
    parser.add_argument(
        "--rng",
        choices=("seed", "replay"),
        default="seed",
        help="seed: a generator seeded like the reference call (default); replay: inject the stored draws",
    )
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="drive the decoders with the stored per-forward logits instead of the model (isolates decoder logic)",
    )
    parser.add_argument(
        "--logits-atol", type=float, default=1e-4, help="absolute tolerance of the per-forward logit check"
    )
    parser.add_argument(
        "--logits-rtol", type=float, default=1e-5, help="relative tolerance of the per-forward logit check"
    )
    parser.add_argument("--no-logits", action="store_true", help="skip the per-forward logit check")
    parser.add_argument("--report", metavar="FILE", help="also write the per-case results as JSON to FILE")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the golden files' torch_num_threads, else 1): fp32 sums depend on it",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from dllm_runtime.conformance import (
        ConformanceOptions,
        load_golden_dir,
        run_directory,
    )

    try:
        files = load_golden_dir(args.directory)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.device != "cpu" and not _device_available(torch, args.device):
        print(f"error: --device {args.device} is not available on this machine", file=sys.stderr)
        return 2
    threads = args.threads or int(files[0].doc.get("env", {}).get("torch_num_threads", 1) or 1)
    torch.set_num_threads(max(1, threads))
    options = ConformanceOptions(
        device=args.device,
        rng=args.rng,
        decoder_only=args.decoder_only,
        logits_atol=None if args.no_logits else args.logits_atol,
        logits_rtol=args.logits_rtol,
    )
    results = run_directory(args.directory, options, select=args.case)
    for result in results:
        print(result.line(), flush=True)
    passed = sum(r.passed for r in results)
    failed = sum(1 for r in results if not r.passed and not r.skipped)
    skipped = sum(1 for r in results if r.skipped)
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary)
    if args.report:
        _write_report(args.report, results, passed, failed, skipped)
    if not results:
        print("error: no case matched", file=sys.stderr)
        return 1
    return 0 if failed == 0 else 1


def _write_report(path: str, results: list[CaseResult], passed: int, failed: int, skipped: int) -> None:
    import dataclasses
    import json
    from pathlib import Path

    doc = {
        "passed": passed,
        "failed": failed,
        "skipped": skipped,
        "cases": [dataclasses.asdict(r) for r in results],
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def _device_available(torch, device: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True
