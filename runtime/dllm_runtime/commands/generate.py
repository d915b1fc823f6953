"""`dllm-serve generate`: decode one prompt from the command line and report what it cost.

The same pieces as the server, minus HTTP and the engine's queue: `load_model` + `load_tokenizer`,
`DecodingParams` from the flags (validated, errors name the flag), `registry.build_policy`, and the
one step loop (`engine.step.run_to_completion`). The text goes to stdout (cut at the first EOS /
end-of-turn token and at `--max-tokens`); one statistics line goes to stderr, so the text can be
piped on its own:

    dllm-serve generate --chat "What is 7 * 6?" --algorithm fast_dllm --threshold 0.9
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: flag -> DecodingParams field for every decoding flag (None default = "use DecodingParams' default")
_DECODING_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--algorithm", "algorithm", str, "decoder: llada | fast_dllm | dream | d3llm (default: dream for Dream "
     "models, else fast_dllm)"),
    ("--steps", "steps", int, "denoising steps for the whole generation (default: one per generation slot)"),
    ("--block-length", "block_length", int, "semi-autoregressive block length (LLaDA, Fast-dLLM, d3LLM)"),
    ("--threshold", "threshold", float, "Fast-dLLM confidence threshold / d3LLM entropy bound "
     "(d3LLM recommends 0.5)"),
    ("--factor", "factor", float, "Fast-dLLM factor rule (takes precedence over --threshold)"),
    ("--cache", "cache", str, "block KV cache: none | prefix | dual (Fast-dLLM); none | prefix (d3LLM's delayed "
     "cache)"),
    ("--temperature", "temperature", float, "sampling temperature (0 = greedy)"),
    ("--top-p", "top_p", float, "nucleus sampling mass (Dream)"),
    ("--top-k", "top_k", int, "top-k filter (Dream; 0 = off)"),
    ("--remasking", "remasking", str, "LLaDA remasking: low_confidence | random"),
    ("--cfg-scale", "cfg_scale", float, "LLaDA classifier-free guidance scale (0 = off)"),
    ("--alg", "alg", str, "Dream: origin | maskgit_plus | topk_margin | entropy"),
    ("--alg-temp", "alg_temp", float, "Dream position-selection temperature (0 = top-k)"),
    ("--eps", "eps", float, "Dream time-schedule epsilon"),
    ("--block-add-threshold", "block_add_threshold", float, "d3LLM: last block's progress that opens the next"),
    ("--decoded-token-threshold", "decoded_token_threshold", float,
     "d3LLM: predecessor's progress that fully activates a block"),
    ("--cache-delay-iter", "cache_delay_iter", int, "d3LLM delayed cache: forwards a decoded block waits "
     "before it is cached (default 2)"),
    ("--cache-refresh-interval", "cache_refresh_interval", int, "d3LLM delayed cache: refresh the cached "
     "prefix every N forwards (default: never)"),
    ("--seed", "seed", int, "per-request seed (default: random); makes sampling reproducible"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (config.json + *.safetensors + tokenizer); "
                        "default: the built-in demo model")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="raw prompt text (no chat template)")
    text.add_argument("--chat", help="user message, wrapped in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-tokens", "--gen-length", dest="max_tokens", type=int, default=None,
                        help="generation length in tokens (default: 256, DecodingParams' default)")
    group = parser.add_argument_group("decoding")
    for flag, dest, kind, help_text in _DECODING_FLAGS:
        group.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    group.add_argument("--early-stop", dest="early_stop", action=argparse.BooleanOptionalAction, default=None,
                       help="d3LLM: fill the tail with EOS once an EOS is decoded (default: on)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text + statistics) instead")


def run(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except _UsageError as exc:
        print(f"dllm-serve generate: error: {exc}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    """A flag, model folder or prompt that cannot be used; the message names it."""


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dllm_runtime.decoding.base import RandomSource, Sequence
    from dllm_runtime.decoding.registry import build_policy
    from dllm_runtime.engine.step import run_to_completion
    from dllm_runtime.models import ModelLoadError, load_model
    from dllm_runtime.tokenizer import TokenizerError, apply_chat_template, load_tokenizer

    folder = _model_folder(args.model)
    device = _device(args.device)
    try:
        model = load_model(folder, dtype=None if args.dtype == "auto" else args.dtype, device=device).eval()
        tokenizer = load_tokenizer(folder)
    except (ModelLoadError, TokenizerError, OSError, ValueError) as exc:
        raise _UsageError(f"--model {folder}: {exc}") from None

    params = _params(args, model)
    try:
        if args.chat is not None:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            prompt = apply_chat_template(tokenizer, messages + [{"role": "user", "content": args.chat}])
        else:
            prompt = list(tokenizer.encode(args.prompt, add_special_tokens=True))
    except TokenizerError as exc:
        raise _UsageError(f"--chat: {exc}") from None
    if not prompt:
        raise _UsageError("--prompt: the prompt encodes to no tokens")

    special = model.special_ids
    canvas = torch.full((1, len(prompt) + params.generation_slots()), special.mask, dtype=torch.long, device=device)
    canvas[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=special, rng=RandomSource(params.seed, device))
    try:
        policy = build_policy(params, model)
        start = time.perf_counter()
        run_to_completion(model, [(seq, policy)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    except ValueError as exc:
        raise _UsageError(_flag_message(exc)) from None

    tokens, finish = completion_tokens(seq.canvas[0, seq.prompt_len :].tolist(), special, params.max_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stats = {
        "algorithm": params.algorithm,
        "prompt_tokens": len(prompt),
        "completion_tokens": len(tokens),
        "nfe": seq.nfe,
        "tokens_per_forward": round(len(tokens) / seq.nfe, 3) if seq.nfe else 0.0,
        "wall_s": round(wall, 4),
        "finish_reason": finish,
    }
    if args.json:
        print(json.dumps({"text": text, **stats}))
    else:
        print(text)
        print("[" + " ".join(f"{k}={v}" for k, v in stats.items()) + "]", file=sys.stderr)
    return 0


def completion_tokens(generated: list[int], special: Any, max_tokens: int) -> tuple[list[int], str]:
    """The answer: generated ids up to the first EOS/end-of-turn (finish "stop") or `max_tokens`
    ("length"). A slot a decoder left masked also ends it (Fast-dLLM's dual cache can leave some)."""
    stops = set(special.stop_ids())
    for i, tok in enumerate(generated[:max_tokens]):
        if tok in stops:
            return generated[:i], "stop"
        if tok == special.mask:
            return generated[:i], "length"
    return generated[:max_tokens], "length"


def _model_folder(model: str | None) -> Path:
    if model is None:
        from dllm_runtime.demo import DemoModelMissingError, demo_model_path

        try:
            return demo_model_path()
        except DemoModelMissingError as exc:
            raise _UsageError(f"no --model given and {exc}") from None
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise _UsageError(f"--model {model}: not a model folder (no config.json)")
    return folder


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise _UsageError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _params(args: argparse.Namespace, model: Any) -> Any:
    """DecodingParams from the flags that were given; the model family picks the default decoder."""
    from dllm_runtime.decoding.params import DecodingParams

    values = {dest: getattr(args, dest) for _, dest, _, _ in _DECODING_FLAGS}
    values["max_tokens"] = args.max_tokens
    values["early_stop"] = args.early_stop
    if values["algorithm"] is None and model.shift_logits:  # Dream checkpoints: Dream's own sampler
        values["algorithm"] = "dream"
    try:
        return DecodingParams.from_dict(values).validate()
    except ValueError as exc:
        raise _UsageError(_flag_message(exc)) from None


def _flag_message(exc: ValueError) -> str:
    """`"steps: must be ..."` -> `"--steps: must be ..."` so the message names the flag to fix."""
    field, sep, rest = str(exc).partition(":")
    if sep and field.isidentifier():
        return f"--{field.replace('_', '-')}:{rest}"
    return str(exc)
