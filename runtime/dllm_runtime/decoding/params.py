"""Per-request decoding settings shared by the server, the engine and the policies.

One dataclass for every algorithm keeps the OpenAI extra-body fields, the `--algorithm/--steps/...`
server flags and the engine's request type in one place. Fields that an algorithm does not read are
ignored by it; `validate()` rejects combinations that would silently do something else than asked
(e.g. a KV cache with the plain LLaDA sampler) with a `ValueError` whose message starts with the
field name, so the server can turn it into a 400 that points at the parameter.

Defaults (why): Fast-dLLM with confidence threshold 0.9 (`resolved_threshold`) and 32-token blocks. On LLaDA-8B-Instruct it
keeps GSM8K accuracy within noise of the full LLaDA sampler while committing several tokens per
forward (Fast-dLLM v1 paper, `eval_gsm8k.sh` settings; ALGORITHMS.md §3), and unlike a fixed step
count its cost adapts to how easy each block is. The KV cache defaults to "none": the prefix/dual
caches are approximations (ALGORITHMS.md §1.9) and cost memory per running sequence, so operators opt
in with `--cache prefix|dual` once they have checked quality on their workload. With
`algorithm="d3llm"`, `cache="prefix"` is d3LLM's delayed prefix cache (`cache_delay_iter`).

Generation length: the references require `gen_length % block_length == 0`. A serving user asks for
`max_tokens` instead, so the canvas gets `generation_slots()` = `max_tokens` rounded up to whole
blocks (the block shrinks to `max_tokens` when that is shorter than one block) and the engine cuts the
output at `max_tokens`. Rounding up rather than shortening the last block keeps every block the same
length, which is what the models were trained and evaluated with, and costs at most one partial block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ALGORITHMS = ("llada", "fast_dllm", "dream", "d3llm")
REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
FAST_DLLM_DEFAULT_THRESHOLD = 0.9
D3LLM_DEFAULT_ENTROPY_THRESHOLD = 0.5


@dataclass
class DecodingParams:
    """How to denoise one request's canvas (see module docstring for defaults and length rules)."""

    algorithm: str = "fast_dllm"
    #: requested generation length in tokens (the output is cut here)
    max_tokens: int = 256
    #: denoising steps for the whole generation; None = one per generation slot (`generation_slots()`)
    steps: int | None = None
    block_length: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    remasking: str = "low_confidence"
    #: Fast-dLLM: commit every masked token whose confidence is >= threshold (a probability);
    #: d3LLM: commit masked tokens whose entropy is below it (nats). None = the algorithm's default,
    #: see `resolved_threshold()`.
    threshold: float | None = None
    #: Fast-dLLM factor rule; when set it takes precedence over `threshold`, as in the reference
    factor: float | None = None
    cache: str = "none"
    #: LLaDA classifier-free guidance (0 = off)
    cfg_scale: float = 0.0
    #: LLaDA reference flags: forbid EOS as a prediction / give EOS and EoT zero confidence
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    # Dream (fields owned by the Dream decoder; validated here so every error comes from one place)
    alg: str = "entropy"
    alg_temp: float = 0.0
    eps: float = 1e-3
    # d3LLM multi-block
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    #: d3LLM: once an EOS is decoded, fill everything after it with EOS and stop (the d3LLM chat default)
    early_stop: bool = True
    #: d3LLM with cache="prefix": a decoded block enters the KV cache this many forwards after it is
    #: complete (d3LLM's delayed cache; 2 = its LLaDA chat script)
    cache_delay_iter: int = 2
    #: d3LLM with cache="prefix": a full forward refreshes the cached prefix every N forwards (None: never)
    cache_refresh_interval: int | None = None
    seed: int | None = None
    #: vLLM's `ignore_eos`: keep decoding past EOS/EoT until `max_tokens` (benchmarks, fidelity runs)
    ignore_eos: bool = False
    #: free-form extras for algorithms added later (kept so `replace`/`from_dict` round-trip)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived lengths
    def effective_block_length(self) -> int:
        """Block length used for the canvas: never longer than the requested generation."""
        return min(self.block_length, self.max_tokens)

    def generation_slots(self) -> int:
        """Masked slots on the canvas: `max_tokens` rounded up to whole blocks."""
        if self.algorithm == "dream":  # Dream's schedule has no blocks, and its length shapes the answer
            return self.max_tokens
        bl = self.effective_block_length()
        return math.ceil(self.max_tokens / bl) * bl

    def num_blocks(self) -> int:
        return self.generation_slots() // self.effective_block_length()

    def resolved_threshold(self) -> float | None:
        """The threshold the algorithm runs with; None selects Fast-dLLM's fixed per-step quota.

        The same field means different things per algorithm (a confidence for Fast-dLLM, an entropy
        bound for d3LLM), so an unset threshold resolves per algorithm instead of carrying one
        algorithm's number into the other: Fast-dLLM 0.9 (its eval setting), d3LLM 0.5 (its chat
        scripts). A Fast-dLLM request that sets `steps` (and no threshold/factor) asks for the
        reference's fixed quota schedule, e.g. the paper's "+cache only" configuration.
        """
        if self.threshold is not None:
            return self.threshold
        if self.algorithm == "d3llm":
            return D3LLM_DEFAULT_ENTROPY_THRESHOLD
        if self.algorithm == "fast_dllm" and self.factor is None and self.steps is None:
            return FAST_DLLM_DEFAULT_THRESHOLD
        return None

    def resolved_steps(self) -> int:
        """`steps`, or one step per generation slot when unset (the quality-first choice)."""
        return self.steps if self.steps is not None else self.generation_slots()

    # ------------------------------------------------------------------ validation
    def validate(self) -> DecodingParams:
        """Raise `ValueError("<field>: ...")` for the first invalid setting; returns self."""
        _check(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}, got {self.algorithm!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("block_length", self.block_length, 1)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        _check(
            _is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be >= 0, got {self.temperature!r}",
        )
        if self.top_p is not None:
            _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 0)
        check_remasking(self.remasking)
        if self.threshold is not None and self.algorithm == "d3llm":
            _check(
                _is_num(self.threshold) and self.threshold > 0,
                "threshold",
                f"must be > 0 (d3LLM: an entropy bound in nats), got {self.threshold!r}",
            )
        elif self.threshold is not None:
            _check(
                _is_num(self.threshold) and 0 < self.threshold <= 1,
                "threshold",
                f"must be in (0, 1], got {self.threshold!r}",
            )
        if self.factor is not None:
            _check(_is_num(self.factor) and self.factor > 0, "factor", f"must be > 0, got {self.factor!r}")
        _check(self.cache in CACHE_MODES, "cache", f"must be one of {CACHE_MODES}, got {self.cache!r}")
        _check(
            self.cache == "none" or self.algorithm == "fast_dllm" or (self.cache, self.algorithm) == ("prefix", "d3llm"),
            "cache",
            f"{self.cache!r} KV cache is available with algorithm='fast_dllm' (prefix, dual) and 'd3llm' (prefix), "
            f"got algorithm={self.algorithm!r}",
        )
        _check_int("cache_delay_iter", self.cache_delay_iter, 0)
        if self.cache_refresh_interval is not None:
            _check_int("cache_refresh_interval", self.cache_refresh_interval, 1)
        _check(_is_num(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", f"must be >= 0, got {self.cfg_scale!r}")
        _check(
            self.cfg_scale == 0 or self.algorithm == "llada",
            "cfg_scale",
            f"classifier-free guidance is only available with algorithm='llada' (got algorithm={self.algorithm!r})",
        )
        _check(self.alg in DREAM_ALGS, "alg", f"must be one of {DREAM_ALGS}, got {self.alg!r}")
        _check(_is_num(self.alg_temp) and self.alg_temp >= 0, "alg_temp", f"must be >= 0, got {self.alg_temp!r}")
        _check(_is_num(self.eps) and 0 <= self.eps < 1, "eps", f"must be in [0, 1), got {self.eps!r}")
        for name in ("early_stop", "ignore_eos"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name, f"must be a boolean, got {value!r}")
        for name in ("block_add_threshold", "decoded_token_threshold"):
            value = getattr(self, name)
            _check(_is_num(value) and 0 <= value <= 1, name, f"must be in [0, 1], got {value!r}")
        if self.seed is not None:
            _check(
                _is_int(self.seed) and 0 <= self.seed < 2**63,
                "seed",
                f"must be an integer in [0, 2**63), got {self.seed!r}",
            )
        if self.algorithm in ("llada", "fast_dllm"):
            self._validate_blocks()
        return self

    def _validate_blocks(self) -> None:
        """The semi-autoregressive schedule: `steps` must split evenly over the blocks."""
        nb = self.num_blocks()
        steps = self.resolved_steps()
        _check(
            steps % nb == 0,
            "steps",
            f"must be a multiple of the number of blocks ({nb} = {self.generation_slots()} generation slots / "
            f"block_length {self.effective_block_length()}), got {steps}",
        )

    # ------------------------------------------------------------------ construction helpers
    def replace(self, **changes: Any) -> DecodingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: DecodingParams | None = None) -> DecodingParams:
        """Overlay `values` (e.g. an OpenAI request's extra body) on `base`; unknown keys are an error.

        `None` values are skipped so that JSON nulls mean "server default".
        """
        known = set(cls.field_names())
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown decoding parameter (known: {', '.join(sorted(known))})")
        changes = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(base or cls(), **changes)


def check_remasking(mode: str) -> None:
    """One rule for the request field and the policies built without a request (conformance, tests)."""
    _check(mode in REMASKING, "remasking", f"must be one of {REMASKING}, got {mode!r}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    _check(_is_int(value) and value >= minimum, name, f"must be an integer >= {minimum}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
