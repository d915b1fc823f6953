"""`dllm-serve download`: fetch a Hub model into a folder, resumable, with JSON progress lines.

Exit codes: 0 done, 3 unauthorized/gated, 4 repository/revision/file not found, 5 no space,
1 network or other error, 2 bad arguments. Imports no torch, so it is quick to start in a Job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dllm_runtime.argtypes import for_argparse, non_negative_float, non_negative_int, positive_float, positive_int
from dllm_runtime.download import (
    DEFAULT_ALLOW_PATTERNS,
    EXIT_CODES,
    DownloadSpec,
    EventWriter,
    download,
    write_termination_log,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME (e.g. GSAI-ML/LLaDA-8B-Instruct)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: the repo's default branch)")
    parser.add_argument("--output", required=True, type=Path, help="destination folder (created if missing)")
    parser.add_argument("--token-file", type=Path, default=None, help="file holding a Hub token (default: $HF_TOKEN)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument(
        "--allow-pattern",
        action="append",
        dest="allow_patterns",
        metavar="GLOB",
        help="file pattern to fetch; repeatable (default: config, safetensors, tokenizer and generation files)",
    )
    parser.add_argument("--progress-file", type=Path, default=None, help="file replaced with the latest JSON event")
    parser.add_argument(
        "--termination-log", type=Path, default=None, help="file receiving the final JSON event (e.g. /dev/termination-log)"
    )
    parser.add_argument("--max-retries", type=for_argparse(non_negative_int), default=3, help="retries of network errors per step (default 3)")
    parser.add_argument("--retry-backoff", type=for_argparse(non_negative_float), default=2.0, help="seconds × attempt between retries (default 2)")
    parser.add_argument(
        "--timeout", type=for_argparse(positive_float), default=60.0, help="seconds without data before an HTTP request fails (default 60)"
    )
    parser.add_argument(
        "--max-workers", type=for_argparse(positive_int), default=4, help="files downloaded in parallel (default 4)"
    )
    parser.add_argument(
        "--progress-interval", type=for_argparse(non_negative_float), default=2.0, help="seconds between progress lines (default 2)"
    )


def run(args: argparse.Namespace) -> int:
    repo_id = args.repo_id.strip()
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        print(f"dllm-serve download: --repo-id must be ORG/NAME, got {args.repo_id!r}", file=sys.stderr)
        return 2
    emit = EventWriter(progress_file=args.progress_file)
    try:
        token = _read_token(args.token_file)
    except OSError as exc:
        event = {"event": "error", "reason": "Unauthorized", "message": f"cannot read --token-file {args.token_file}: {exc.strerror}"}
        emit(event)
        write_termination_log(args.termination_log, event)
        return EXIT_CODES["Unauthorized"]
    spec = DownloadSpec(
        repo_id=repo_id,
        output=args.output,
        revision=args.revision or None,  # an empty value (unset template variable) means the default branch
        token=token,
        endpoint=args.endpoint,
        allow_patterns=tuple(args.allow_patterns or DEFAULT_ALLOW_PATTERNS),
        max_retries=args.max_retries,
        retry_backoff_s=args.retry_backoff,
        progress_interval_s=args.progress_interval,
        max_workers=args.max_workers,
        timeout_s=args.timeout,
    )
    return download(spec, emit, termination_log=args.termination_log)


def _read_token(token_file: Path | None) -> str | None:
    """The token from `--token-file` (a mounted Secret), else `$HF_TOKEN`; never logged."""
    if token_file is not None:
        return token_file.read_text(encoding="utf-8").strip() or None
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
