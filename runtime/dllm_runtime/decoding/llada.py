"""LLaDA reference sampler (`ML-GSAI/LLaDA: generate.py::generate`, b7e6c35; ALGORITHMS.md §1.1).

Semi-autoregressive blocks; in each block the masked slots get a fixed per-step quota and the most
confident predictions (or random ones) are committed. Always `steps` forwards (NFE = steps): no early
break, EOS is an ordinary token. Optional classifier-free guidance runs a second, unconditional row
(prompt masked) in the same forward, and the two EOS/EoT flags of the reference are supported with
the ids taken from the model's special ids instead of LLaDA-8B literals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dllm_runtime.decoding.base import (
    DecodingPolicy,
    ForwardSpec,
    PositionFn,
    Sequence,
    block_span,
    canvas_positions,
    masked_in_reach,
    open_block,
)
from dllm_runtime.decoding.params import DecodingParams, check_remasking
from dllm_runtime.decoding.primitives import (
    GreedyCommits,
    apply_transfer,
    argmax_probability,
    gather_prob,
    gumbel_argmax,
    quota,
    scatter_candidates,
    top_k_choice,
    topk_rows,
)
from dllm_runtime.decoding.registry import (
    ReferenceDecoder,
    register_algorithm,
    register_reference,
)
from dllm_runtime.models.base import DiffusionModel, SpecialIds
from dllm_runtime.models.llada import llada_position_ids

@dataclass(frozen=True)
class LLaDAConfig:
    steps: int
    block_length: int
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    #: serving-only sampling filters at T > 0 (no upstream equivalent; None = off)
    top_k: int | None = None
    top_p: float | None = None


def check_blocks(gen_length: int, block_length: int, steps: int) -> tuple[int, int]:
    """The semi-AR schedule's divisibility rules; returns `(num_blocks, steps_per_block)`."""
    if block_length <= 0 or gen_length % block_length:
        raise ValueError(f"block_length: {block_length} must divide the generation length {gen_length}")
    nb = gen_length // block_length
    if steps <= 0 or steps % nb:
        raise ValueError(f"steps: {steps} must be a positive multiple of the number of blocks {nb}")
    return nb, steps // nb


class LLaDAPolicy(DecodingPolicy):
    """The LLaDA `generate` loop as a plan/commit policy; state lives in `seq.state`."""

    name = "llada"

    def __init__(self, config: LLaDAConfig, position_ids: PositionFn | None = None) -> None:
        check_remasking(config.remasking)
        self.config = config
        self.position_ids = position_ids or llada_position_ids

    def init(self, seq: Sequence) -> None:
        nb, spb = check_blocks(seq.gen_length, self.config.block_length, self.config.steps)
        seq.state.update(
            num_blocks=nb,
            steps_per_block=spb,
            block=0,
            step=0,
            quota=[],
            # computed once, as upstream: left pads count as prompt (the CFG branch masks them too)
            prompt_index=seq.canvas != seq.special.mask,
            positions=canvas_positions(seq, self.position_ids),
        )

    def plan(self, seq: Sequence) -> ForwardSpec | None:
        st = seq.state
        if st["block"] >= st["num_blocks"]:
            return None
        if st["step"] == 0:
            lo, hi = block_span(seq, self.config.block_length)
            n = int((seq.canvas[0, lo:hi] == seq.special.mask).sum())
            st["quota"] = quota(n, st["steps_per_block"])
            open_block(seq, self.config.block_length)
        x, positions, valid = seq.canvas, st["positions"], seq.valid
        if self.config.cfg_scale > 0:
            unconditional = x.clone()
            unconditional[st["prompt_index"]] = seq.special.mask
            x = torch.cat([x, unconditional])
            positions = torch.cat([positions, positions])
            valid = None if valid is None else torch.cat([valid, valid])
        # the slots this step may commit: upstream sets `conf[:, hi:] = -inf` and `where(mask, conf,
        # -inf)`, and every op that decides a step is per position, so the forward computes logits
        # for these positions only; `commit` reads them again (the canvas does not change in between)
        st["candidates"] = masked_in_reach(seq)
        return ForwardSpec(input_ids=x, positions=positions, valid=valid, logits_at=st["candidates"][0])

    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`logits` `(R, n, V)` at the `n` candidate slots (`ForwardSpec.logits_at`)."""
        cfg, st, special = self.config, seq.state, seq.special
        if cfg.cfg_scale > 0:
            cond, uncond = logits[0:1], logits[1:2]
            logits = uncond + (cfg.cfg_scale + 1) * (cond - uncond)
        x = seq.canvas
        candidates = st["candidates"]
        selected = logits[0].clone()  # (n, V); the in-place edits below stay local
        full_shape = (1, x.shape[1], selected.shape[-1])  # the reference's (B, L, V): same RNG draws
        if cfg.logits_eos_inf:
            selected[:, special.eos] = -torch.inf
        x0_sel = gumbel_argmax(selected, cfg.temperature, seq.rng, full_shape, candidates, cfg.top_k, cfg.top_p)
        if cfg.confidence_eos_eot_inf:
            # after the argmax, as upstream. At T == 0 the Gumbel output IS the logits tensor, so both
            # EOS and EoT lose their probability mass; at T > 0 only EoT does (EOS hits the noisy copy)
            if cfg.temperature == 0:
                selected[:, special.eos] = -torch.inf
            if special.eot is not None:
                selected[:, special.eot] = -torch.inf
        if cfg.remasking == "low_confidence":
            p_sel = gather_prob(torch.softmax(selected, dim=-1), x0_sel)  # softmax in the logits' dtype
        else:
            p_sel = seq.rng.rand(tuple(x.shape), torch.float32, x.device)[candidates]
        x0, confidence = scatter_candidates(x, candidates, x0_sel, p_sel, -torch.inf)
        transfer = topk_rows(confidence, [st["quota"][st["step"]]])
        apply_transfer(x, transfer, x0)
        self._next_step(st)

    @staticmethod
    def _next_step(st: dict) -> None:
        st["step"] += 1
        if st["step"] == st["steps_per_block"]:
            st["step"] = 0
            st["block"] += 1

    @property
    def greedy(self) -> bool:
        """Argmax tokens, committed by probability, no CFG or EOS edits: what `commit_many` batches."""
        cfg = self.config
        plain = not (cfg.cfg_scale > 0 or cfg.logits_eos_inf or cfg.confidence_eos_eot_inf)
        return plain and cfg.temperature == 0 and cfg.remasking == "low_confidence"

    @classmethod
    def commit_many(cls, items: list[tuple[DecodingPolicy, Sequence, torch.Tensor]]) -> list[int]:
        """Greedy sequences in one go (`GreedyCommits`): each takes its step's quota of most confident
        candidates. One whose quota boundary is a tie is left to `commit`, whose full-row `topk` breaks
        it as the reference does."""
        batch = GreedyCommits.collect(items, argmax_probability())  # the softmax in the logits' dtype, as upstream
        if batch is None:
            return list(range(len(items)))
        chosen = {}
        for j, seq in enumerate(batch.seqs):
            choice = top_k_choice(batch.confidence[j], seq.state["quota"][seq.state["step"]])
            if choice is not None:
                chosen[j] = choice
        written = batch.write(chosen, [(seq.canvas, seq.state["candidates"]) for seq in batch.seqs])
        for j in written:
            cls._next_step(batch.seqs[j].state)
        return batch.left(written)


# ---------------------------------------------------------------------------- registry entries
def from_params(params: DecodingParams, model: DiffusionModel) -> LLaDAPolicy:
    """Serving: `algorithm="llada"` on a LLaDA-architecture model."""
    require_unshifted(model, "llada")
    config = LLaDAConfig(
        steps=params.resolved_steps(),
        block_length=params.effective_block_length(),
        temperature=float(params.temperature),
        cfg_scale=float(params.cfg_scale),
        remasking=params.remasking,
        logits_eos_inf=params.logits_eos_inf,
        confidence_eos_eot_inf=params.confidence_eos_eot_inf,
        top_k=sampling_top_k(params),
        top_p=sampling_top_p(params),
    )
    return LLaDAPolicy(config, model.position_ids)


def sampling_top_k(params: DecodingParams) -> int | None:
    """`top_k` as a filter, or None when it is off (unset or 0, as in vLLM)."""
    return params.top_k if params.top_k else None


def sampling_top_p(params: DecodingParams) -> float | None:
    """`top_p` as a filter, or None when it is off (unset or 1)."""
    return params.top_p if params.top_p is not None and params.top_p < 1 else None


def require_unshifted(model: DiffusionModel, algorithm: str) -> None:
    if getattr(model, "shift_logits", False):
        raise ValueError(
            f"algorithm: {algorithm!r} decodes LLaDA-architecture models; this model "
            f"({getattr(model, 'model_type', '?')}) predicts shifted logits, use algorithm='dream'"
        )


_LLADA_DEFAULTS: dict[str, Any] = dict(
    steps=128, gen_length=128, block_length=128, temperature=0.0, cfg_scale=0.0,
    remasking="low_confidence", logits_eos_inf=False, confidence_eos_eot_inf=False,
)  # fmt: skip


def reference_kwargs(
    kwargs: dict[str, Any], defaults: dict[str, Any], special: SpecialIds
) -> tuple[dict[str, Any], SpecialIds]:
    """Overlay a recorded call's kwargs on the upstream signature's defaults.

    `attention_mask` is canvas layout (the conformance runner applies it), and upstream's literal
    `mask_id` default is LLaDA-8B's mask id, which `special.mask` names for the model at hand.
    Unknown arguments are an error so that a new upstream argument is never silently ignored.
    """
    args = dict(defaults)
    extra = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "mask_id")}
    unknown = sorted(set(extra) - set(defaults))
    if unknown:
        raise ValueError(f"{unknown[0]}: argument not supported by this decoder (known: {sorted(defaults)})")
    args.update(extra)
    if "mask_id" in kwargs:
        special = SpecialIds(
            mask=int(kwargs["mask_id"]), eos=special.eos, pad=special.pad, eot=special.eot, bos=special.bos
        )
    return args, special


def from_reference(kwargs: dict[str, Any], special: SpecialIds) -> ReferenceDecoder:
    args, special = reference_kwargs(kwargs, _LLADA_DEFAULTS, special)
    config = LLaDAConfig(
        steps=int(args["steps"]),
        block_length=int(args["block_length"]),
        temperature=float(args["temperature"]),
        cfg_scale=float(args["cfg_scale"]),
        remasking=args["remasking"],
        logits_eos_inf=bool(args["logits_eos_inf"]),
        confidence_eos_eot_inf=bool(args["confidence_eos_eot_inf"]),
    )
    return ReferenceDecoder(LLaDAPolicy(config), int(args["gen_length"]), special)


register_algorithm("llada", from_params)
register_reference("ML-GSAI/LLaDA generate.py::generate", from_reference)
