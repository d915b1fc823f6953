"""`dllm-serve serve` flags: vLLM's names where vLLM has one, each also settable as `DLLM_<NAME>`.

Precedence is CLI > environment > default. Flags are declared once in a table so that the parser,
the environment lookup, the docs (docs/tuning.md) and the error messages cannot drift apart.
Diffusion flags are the *server defaults* of `DecodingParams`; a request may override each of them
as an extra body field. A diffusion flag left unset keeps `DecodingParams`' own default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dllm_runtime.argtypes import for_argparse, non_negative_float, non_negative_int, port, positive_int

ENV_PREFIX = "DLLM_"


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _optional_str(text: str) -> str | None:
    return text or None


@dataclass(frozen=True)
class Option:
    """One flag: `--name`, its parser, default, help and its environment variable."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: Sequence[str] | None = None
    flag: bool = False  # a switch (`--trust-remote-code`), true when present

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


SERVER_OPTIONS: tuple[Option, ...] = (
    Option("model", str, None, "Model folder (config.json + *.safetensors + tokenizer). "
           "Default: the built-in demo model. In KServe: /mnt/models."),
    Option("model-wait-timeout", non_negative_float, 0.0, "Seconds to wait for <model>/config.json to "
           "appear (a modelcar sidecar or a copy still filling the folder); readiness is 503 meanwhile."),
    Option("served-model-name", str, None, "Name clients use in `model` and the readiness paths "
           "(default: the model folder's name; `dllm-demo` for the built-in model)."),
    Option("host", str, "0.0.0.0", "Address to listen on."),
    Option("port", port, 8080, "HTTP port (OpenAI API, health, readiness and /metrics)."),
    Option("dtype", str, "auto", "Weight dtype; `auto` keeps the checkpoint's dtype "
           "(float32 on CPU).", choices=("auto", "float32", "bfloat16", "float16")),
    Option("device", str, "auto", "torch device: `auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`."),
    Option("max-model-len", positive_int, None, "Longest prompt + max_tokens accepted "
           "(default: the model's max_position_embeddings / max_sequence_length)."),
    Option("max-num-seqs", positive_int, 16, "Most sequences decoded together in one forward (batch slots)."),
    Option("max-num-batched-tokens", positive_int, None, "Most canvas tokens in one forward (default: engine's)."),
    Option("max-waiting", non_negative_int, 256, "Most requests queued behind the running batch; "
           "beyond it requests get 429 with Retry-After."),
    Option("max-cache-bytes", positive_int, None, "KV-cache memory budget in bytes across running "
           "sequences (default: engine's)."),
    Option("engine-process", _bool, False, "Run the engine in a child process (vLLM's engine-core split) "
           "instead of a thread of the server: HTTP and the step loop stop sharing one interpreter lock. "
           "Wants a spare CPU core for each (GPU nodes); see docs/engine.md.", flag=True),
    Option("api-key", _optional_str, None, "If set, /v1 and /openai/v1 require `Authorization: Bearer <key>`."),
    Option("trust-remote-code", _bool, False, "Accepted for vLLM compatibility and ignored: "
           "dllm-serve runs no remote code (native models only).", flag=True),
    Option("max-body-bytes", positive_int, 8 * 1024 * 1024, "Largest accepted request body; larger gets 413."),
    Option("max-n", positive_int, 16, "Most choices per request (`n` x number of prompts)."),
    Option("default-max-tokens", positive_int, 128, "Generation length when a request sets neither "
           "max_tokens nor max_completion_tokens."),
    Option("grace-period", non_negative_float, 30.0, "Seconds to finish in-flight requests after SIGTERM "
           "(new requests get 503 meanwhile). Keep below the pod's terminationGracePeriodSeconds."),
    Option("retry-after", positive_int, 1, "Seconds sent in Retry-After with 429 (queue full) and 503."),
    Option("enable-grpc", _bool, False, "Also start KServe's gRPC (v2) server.", flag=True),
    Option("grpc-port", port, 8081, "gRPC port when --enable-grpc."),
)

#: Server defaults of `dllm_runtime.decoding.params.DecodingParams`; `dest` is the field name.
DECODING_OPTIONS: tuple[Option, ...] = (
    Option("algorithm", str, None, "Decoder (default: the model family's own).",
           choices=("llada", "fast_dllm", "dream", "d3llm")),
    Option("steps", positive_int, None, "Denoising steps over the whole generation."),
    Option("block-length", positive_int, None, "Semi-autoregressive block length."),
    Option("temperature", non_negative_float, None, "Default sampling temperature (0 = greedy)."),
    Option("top-p", float, None, "Default nucleus sampling mass."),
    Option("top-k", int, None, "Default top-k."),
    Option("remasking", str, None, "LLaDA remasking.", choices=("low_confidence", "random")),
    Option("threshold", float, None, "Fast-dLLM / d3LLM confidence threshold (parallel commits)."),
    Option("factor", float, None, "Fast-dLLM factor-based parallel decoding."),
    Option("cache", str, None, "Block KV cache (d3LLM: prefix = its delayed cache).",
           choices=("none", "prefix", "dual")),
    Option("cfg-scale", non_negative_float, None, "Classifier-free guidance scale (LLaDA)."),
    Option("alg", str, None, "Dream remasking algorithm.", choices=("origin", "maskgit_plus", "topk_margin", "entropy")),
    Option("alg-temp", float, None, "Dream position-selection temperature."),
    Option("eps", float, None, "Dream time-schedule epsilon."),
    Option("block-add-threshold", float, None, "d3LLM: progress of a block before the next one starts."),
    Option("decoded-token-threshold", float, None, "d3LLM: fraction decoded before a block completes."),
    Option("cache-delay-iter", non_negative_int, None, "d3LLM delayed cache: forwards a decoded block waits "
           "before it is cached."),
    Option("cache-refresh-interval", positive_int, None, "d3LLM delayed cache: refresh the cached prefix "
           "every N forwards."),
)


@dataclass
class ServeSettings:
    """Resolved settings of one server process."""

    model: str | None
    model_wait_timeout: float
    served_model_name: str | None
    host: str
    port: int
    dtype: str
    device: str
    max_model_len: int | None
    max_num_seqs: int
    max_num_batched_tokens: int | None
    max_waiting: int
    max_cache_bytes: int | None
    engine_process: bool
    api_key: str | None
    trust_remote_code: bool
    max_body_bytes: int
    max_n: int
    default_max_tokens: int
    grace_period: float
    retry_after: int
    enable_grpc: bool
    grpc_port: int
    #: only the diffusion flags that were set; DecodingParams' defaults fill the rest
    decoding: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every flag with default None so that `resolve` can tell 'unset' from 'set'."""
    for title, options in (("server", SERVER_OPTIONS), ("diffusion defaults", DECODING_OPTIONS)):
        group = parser.add_argument_group(title)
        for opt in options:
            default_text = "" if opt.default is None else f", default {opt.default}"
            help_text = f"{opt.help} [env {opt.env}{default_text}]"
            if opt.flag:
                group.add_argument(f"--{opt.name}", dest=opt.dest, action="store_const", const=True,
                                   default=None, help=help_text)
            else:
                group.add_argument(f"--{opt.name}", dest=opt.dest, type=_argparse_type(opt), default=None,
                                   choices=opt.choices, help=help_text)


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    convert = for_argparse(opt.parse)
    convert.__name__ = opt.dest
    return convert


class SettingsError(ValueError):
    """A flag or environment variable has an invalid value (message names it)."""


def _resolve_one(opt: Option, cli_value: Any, environ: Mapping[str, str]) -> Any:
    if cli_value is not None:
        return cli_value
    raw = environ.get(opt.env)
    if raw is None or (raw == "" and opt.default is not None and not opt.flag):
        return opt.default
    try:
        value = opt.parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{opt.env}={raw!r}: {exc}") from None
    if opt.choices is not None and value not in opt.choices:
        raise SettingsError(f"{opt.env}={raw!r}: choose from {', '.join(opt.choices)}")
    return value


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """CLI values, then `DLLM_*` environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    values = {opt.dest: _resolve_one(opt, getattr(args, opt.dest, None), environ) for opt in SERVER_OPTIONS}
    decoding = {}
    for opt in DECODING_OPTIONS:
        value = _resolve_one(opt, getattr(args, opt.dest, None), environ)
        if value is not None:
            decoding[opt.dest] = value
    return ServeSettings(**values, decoding=decoding)
