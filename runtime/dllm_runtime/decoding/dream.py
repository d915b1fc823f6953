"""Dream `diffusion_generate` (Dream-org/Dream-v0-Instruct-7B `generation_utils.py`) as a policy.

One forward per step over the full canvas, with the LM head only on the rows that predict a masked
slot; the raw logits are shifted right by one (position p is predicted from the hidden state at p-1,
Dream's AR initialisation) and then one of four rules picks which masked slots to commit
(ALGORITHMS.md §1.3):

* `origin`       - every masked slot flips a float32 coin with probability `1 - s/t` and, if it
                   comes up, is sampled; the last step commits everything.
* `maskgit_plus` - confidence = probability of the chosen token,
* `topk_margin`  - confidence = top-1 minus top-2 probability,
* `entropy`      - confidence = negative entropy;
  for the last three the `n = int(m * (1 - s/t))` most confident slots are committed (or sampled
  from `softmax(conf / alg_temp)` when `alg_temp > 0`).

Exactness notes (what the golden vectors check):
* The timestep schedule `linspace(1, eps, steps + 1)` and the transfer count are float32, like the
  reference; with `steps == gen_length` the first step commits nothing.
* `m` in the reference is the *batch mean* of masked slots (`mask.sum() / B`). The step loop batches
  B independent sequences, each with its own policy, so here `m` is the per-sequence count. The two
  agree whenever the reference's rows hold equal mask counts, which is always the case for its
  equal-length generation regions (golden `dream_entropy_batch2_leftpad_t0`); with unequal counts the
  reference would overwrite committed tokens with MASK, which no per-request server should copy.
* Every random draw goes through `seq.rng` in the reference's order: `origin` draws one float32
  `rand(#masked)` then samples the selected rows; the other algorithms at T > 0 sample every masked
  row (one `Categorical.sample` = one `multinomial(p, 1, True)`), then `alg_temp > 0` draws one
  `multinomial(softmax(conf / alg_temp), n)`. `Categorical` normalises `p` before sampling, so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dllm_runtime.decoding.base import (
    DecodingPolicy,
    ForwardSpec,
    PositionFn,
    RandomSource,
    Sequence,
    canvas_positions,
)
from dllm_runtime.decoding.params import DREAM_ALGS, DecodingParams
from dllm_runtime.decoding.primitives import GreedyCommits, Scorer, top_k_choice
from dllm_runtime.decoding.registry import ReferenceDecoder, register_algorithm, register_reference
from dllm_runtime.models.base import DiffusionModel, SpecialIds
from dllm_runtime.models.dream import dream_position_ids

@dataclass(frozen=True)
class DreamSettings:
    """The reference's generation-config fields that shape decoding (defaults as in Dream's config)."""

    steps: int
    alg: str = "origin"
    temperature: float = 0.0
    top_p: float | None = None
    #: None or 0 = no top-k filter (0 follows vLLM's "disabled" convention)
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float = 1e-3

    def validate(self) -> DreamSettings:
        """Raise `ValueError("<field>: ...")` for settings the reference would reject or misuse."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: must be an integer >= 1, got {self.steps!r}")
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg: must be one of {DREAM_ALGS}, got {self.alg!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0, got {self.top_k!r}")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp: must be >= 0, got {self.alg_temp!r}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps: must be in [0, 1), got {self.eps!r}")
        return self


# ---------------------------------------------------------------------------------------- sampling
def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's right shift: position p gets the logits of p-1, position 0 keeps its own."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def source_rows(slots: torch.Tensor, shift: bool) -> torch.Tensor:
    """Rows of the raw logits that predict canvas `slots` (1-D, ascending).

    Equal to indexing `shift_right(logits)` at `slots`, without copying the whole `(L, V)` tensor
    every step (hundreds of MB for a 150k vocabulary).
    """
    return (slots - 1).clamp_min(0) if shift else slots


def rows_wanted(slots: torch.Tensor, length: int, shift: bool) -> torch.Tensor:
    """`ForwardSpec.logits_at` `(length,)` for reading canvas `slots`: the rows that predict them.

    Dream-family models predict slot p from row p-1, so a step needs the head on those rows only,
    not on the whole canvas (a 150k vocabulary makes full-canvas logits GBs at batch 32).
    """
    wanted = torch.zeros(length, dtype=torch.bool, device=slots.device)
    wanted[source_rows(slots, shift)] = True
    return wanted


def slot_logits(
    logits: torch.Tensor, slots: torch.Tensor, shift: bool, wanted: torch.Tensor | None, window: int = 0
) -> torch.Tensor:
    """`(n, V)`: the first row's prediction for each of canvas `slots` (1-D, ascending).

    `logits` is the output of a forward over the window starting at canvas position `window`: for
    `wanted` (`(R, wanted.sum(), V)`, rows in window order), or all its rows when `wanted` is None.
    """
    rows = source_rows(slots - window, shift)
    if wanted is not None:
        rows = wanted.cumsum(0)[rows] - 1  # position of each row among the computed ones
    return logits[0, rows]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop tokens whose cumulative probability (sorted desc) exceeds `top_p`.

    The drop flags are shifted right by one so the most likely token always survives; dropped
    entries get `finfo.min` (not -inf, as in the reference, so a row can never become all -inf).
    """
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits (ties with the k-th are kept), the rest get `finfo.min`."""
    k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    rng: RandomSource,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(confidence, token)` per row of `logits` `(N, V)`, as Dream's `sample_tokens`.

    At T > 0 the token is one categorical draw per row (through `rng`); the reference falls back to
    argmax when `Categorical` rejects its input, which for finite logits only happens on non-finite
    probabilities, so that is the fallback kept here.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and bool(torch.isfinite(probs).all()):
        tokens = rng.categorical(probs / probs.sum(-1, keepdim=True))
        confidence = torch.gather(probs, -1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, tokens


# ------------------------------------------------------------------------------------------ policy
class DreamPolicy(DecodingPolicy):
    """Dream's `diffusion_generate` loop, one step per `plan`/`commit` pair."""

    name = "dream"

    def __init__(self, settings: DreamSettings, position_ids: PositionFn, shift_logits: bool = True) -> None:
        self.settings = settings.validate()
        self.position_ids = position_ids
        self.shift_logits = shift_logits

    def init(self, seq: Sequence) -> None:
        if seq.gen_length < 1:
            raise ValueError("max_tokens: Dream needs at least one generation slot")
        seq.state["step"] = 0
        seq.state["positions"] = canvas_positions(seq, self.position_ids)
        # float32 like the reference (`torch.linspace` default dtype), on the canvas's device
        seq.state["timesteps"] = torch.linspace(
            1, self.settings.eps, self.settings.steps + 1, dtype=torch.float32, device=seq.canvas.device
        )
        seq.state["unmasked_per_step"] = []
        # each step's `1 - s/t`, float32 as the reference computes it (`_transfer_count` reads them)
        ts = seq.state["timesteps"]
        seq.state["transfer_factors"] = (1 - ts[1:] / ts[:-1]).tolist()

    def plan(self, seq: Sequence) -> ForwardSpec | None:
        if seq.state["step"] >= self.settings.steps:
            return None
        # `commit` reads it again: the canvas does not change in between
        seq.state["slots"] = self._masked_slots(seq)
        seq.state["rows_wanted"] = rows_wanted(seq.state["slots"], seq.length, self.shift_logits)
        return ForwardSpec(
            input_ids=seq.canvas, positions=seq.state["positions"], valid=seq.valid, logits_at=seq.state["rows_wanted"]
        )

    def _masked_slots(self, seq: Sequence) -> torch.Tensor:
        return (seq.canvas[0] == seq.special.mask).nonzero().squeeze(1)

    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`logits` `(R, n, V)` at the rows `plan` asked for (`ForwardSpec.logits_at`)."""
        cfg = self.settings
        i = seq.state["step"]
        x = seq.canvas
        mask_id = seq.special.mask
        masked = x == mask_id
        # == shift_right(logits)[masked] (B = 1: row-major order is ascending slot order)
        before = seq.state["slots"].numel()
        mask_logits = self._mask_logits(seq, logits)
        t, s = seq.state["timesteps"][i], seq.state["timesteps"][i + 1]
        last = i == cfg.steps - 1

        if cfg.alg == "origin":
            p_transfer = 1 - s / t if not last else 1
            coins = seq.rng.rand((mask_logits.shape[0],), torch.float32, x.device)
            chosen = coins < p_transfer
            y = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
            _, y[chosen] = sample_tokens(mask_logits[chosen], seq.rng, cfg.temperature, cfg.top_p, cfg.top_k)
            x.masked_scatter_(masked, y)  # x[masked] = y without a boolean-index write (a host sync on a GPU)
        else:
            confidence, y = sample_tokens(
                mask_logits,
                seq.rng,
                cfg.temperature,
                cfg.top_p,
                cfg.top_k,
                margin_confidence=cfg.alg == "topk_margin",
                neg_entropy=cfg.alg == "entropy",
            )
            n = self._transfer_count(seq, before)
            if n > 0:
                full = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
                full.masked_scatter_(masked, confidence.to(full.dtype))  # = full[masked] = confidence
                if not cfg.alg_temp:
                    idx = torch.topk(full, n).indices
                else:
                    idx = seq.rng.multinomial(F.softmax(full / cfg.alg_temp, dim=-1), n)
                proposal = torch.full_like(x, mask_id).masked_scatter_(masked, y)
                x[0, idx[0]] = proposal[0, idx[0]]

        seq.state["unmasked_per_step"].append(before - int((x == mask_id).sum()))
        seq.state["step"] = i + 1

    def _mask_logits(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """`(n, V)`: the prediction for each masked slot (`== shift_right(logits)[masked]`; B = 1, so
        row-major order is ascending slot order)."""
        return slot_logits(logits, seq.state["slots"], self.shift_logits, seq.state["rows_wanted"])

    def _transfer_count(self, seq: Sequence, masked: int) -> int:
        """How many of the `masked` slots this step commits: all at the last step, else the reference's
        float32 `int(m * (1 - s/t))` with `m` the sequence's masked count (see the module doc). The
        product of two float32 values is exact in a double, so rounding it once to float32 is the
        float32 multiply."""
        i = seq.state["step"]
        if i == self.settings.steps - 1:
            return masked
        return int(torch.tensor(masked * seq.state["transfer_factors"][i], dtype=torch.float32))

    @property
    def greedy(self) -> bool:
        """Argmax tokens and a top-n pick by confidence (no sampling, filters, `alg_temp` or `origin`
        coins): what `commit_many` batches."""
        cfg = self.settings
        unfiltered = not cfg.top_k and (cfg.top_p is None or cfg.top_p >= 1)
        return cfg.temperature == 0 and cfg.alg != "origin" and not cfg.alg_temp and unfiltered

    @classmethod
    def commit_many(cls, items: list[tuple[DecodingPolicy, Sequence, torch.Tensor]]) -> list[int]:
        """Greedy sequences in one go (`GreedyCommits`), one batch per confidence rule: each commits its
        step's `n` most confident slots. One whose n-th and (n+1)-th confidences tie is left to `commit`."""
        left = set(range(len(items)))
        for alg in DREAM_ALGS:
            members = [i for i, (p, _, _) in enumerate(items) if p.greedy and p.settings.alg == alg]
            batch = GreedyCommits.collect(items, _greedy_scorer(alg), rows=cls._rows, members=members)
            if batch is None:
                continue
            chosen = {}
            for j, (policy, seq, confidence) in enumerate(zip(batch.policies, batch.seqs, batch.confidence)):
                choice = top_k_choice(confidence, policy._transfer_count(seq, len(confidence)))
                if choice is not None:
                    chosen[j] = choice
            written = batch.write(chosen, [(seq.canvas, seq.canvas == seq.special.mask) for seq in batch.seqs])
            for j in written:
                state = batch.seqs[j].state
                state["unmasked_per_step"].append(sum(chosen[j]))
                state["step"] += 1
            left -= {batch.members[j] for j in written}
        return sorted(left)

    @staticmethod
    def _rows(policy: DreamPolicy, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        return policy._mask_logits(seq, logits)


def _greedy_scorer(alg: str) -> Scorer:
    """`sample_tokens` at temperature 0 for `alg`, confidences in the logits' dtype (as `commit` ranks them)."""

    def score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        confidence, tokens = sample_tokens(
            logits, None, margin_confidence=alg == "topk_margin", neg_entropy=alg == "entropy"
        )
        return tokens, confidence.to(logits.dtype)

    return score


# ---------------------------------------------------------------------------------- registration
def settings_from_params(params: DecodingParams) -> DreamSettings:
    return DreamSettings(
        steps=params.resolved_steps(),
        alg=params.alg,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        alg_temp=params.alg_temp,
        eps=params.eps,
    )


def _policy_from_params(params: DecodingParams, model: DiffusionModel) -> DecodingPolicy:
    """Serving: Dream's samplers on any model; the shift follows the model (Dream: right shift)."""
    reject_unused(params, "dream", remasking="picks positions with `alg`", factor="has no factor rule")
    return DreamPolicy(settings_from_params(params), model.position_ids, shift_logits=model.shift_logits)


def reject_unused(params: DecodingParams, algorithm: str, **why: str) -> None:
    """A setting the chosen decoder would silently ignore is a client mistake: name it."""
    defaults = DecodingParams()
    for name, reason in why.items():
        if getattr(params, name) != getattr(defaults, name):
            raise ValueError(f"{name}: not used by algorithm={algorithm!r} (it {reason})")


#: keyword arguments of `diffusion_generate` that shape decoding; anything else is rejected so a
#: golden case can never pass while silently ignoring one of its settings
_REFERENCE_KWARGS = {"max_new_tokens", "steps", "alg", "temperature", "top_p", "top_k", "alg_temp", "eps"}


def _policy_from_reference(kwargs: dict[str, Any], special: SpecialIds) -> ReferenceDecoder:
    unknown = sorted(set(kwargs) - _REFERENCE_KWARGS)
    if unknown:
        raise ValueError(f"{unknown[0]}: diffusion_generate argument not supported by DreamPolicy")
    if kwargs.get("max_new_tokens") is None:
        raise ValueError("max_new_tokens: required (the max_length default of 20 is not supported)")
    settings = DreamSettings(
        steps=int(kwargs.get("steps", 512)),
        alg=kwargs.get("alg", "origin"),
        temperature=float(kwargs.get("temperature") or 0.0),
        top_p=kwargs.get("top_p"),
        top_k=kwargs.get("top_k"),
        alg_temp=kwargs.get("alg_temp"),
        eps=float(kwargs.get("eps", 1e-3)),
    )
    policy = DreamPolicy(settings, dream_position_ids, shift_logits=True)
    return ReferenceDecoder(policy=policy, gen_length=int(kwargs["max_new_tokens"]), special=special)


register_algorithm("dream", _policy_from_params)
register_reference("Dream-v0-Instruct-7B generation_utils.py::diffusion_generate", _policy_from_reference)
