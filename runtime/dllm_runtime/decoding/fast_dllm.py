"""Fast-dLLM v1 for LLaDA (`NVlabs/Fast-dLLM: v1/llada/generate.py`, a9b81e4; ALGORITHMS.md §1.2).

Three reference functions, one policy:

* `generate` (`cache="none"`): a full forward per step; a block ends as soon as it has no mask.
* `generate_with_prefix_cache` (`cache="prefix"`): per block one full forward that stores the KV
  cache, then forwards of the suffix `x[s:]` only, attending to the frozen prefix keys `kv[:s]`.
  At T > 0 each cached step makes one extra, discarded Gumbel draw (an upstream quirk the RNG
  stream depends on).
* `generate_with_dual_cache` (`cache="dual"`): per block one full forward, then forwards of the block
  `x[s:e]` only, attending to the frozen prefix and suffix keys; at most `steps_per_block - 1`
  cached steps, so a threshold run with few steps can leave masks that the next block's first step
  may fill (and the last block's stay masked, as upstream).

Per step the transfer rule is a fixed quota, a confidence `threshold` or the `factor` rule
(`factor` wins when both are set, as upstream). Softmax in float64.
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
from dllm_runtime.decoding.llada import (
    check_blocks,
    reference_kwargs,
    require_unshifted,
    sampling_top_k,
    sampling_top_p,
)
from dllm_runtime.decoding.params import DecodingParams, check_remasking
from dllm_runtime.decoding.primitives import (
    GreedyCommits,
    apply_transfer,
    argmax_probability,
    quota,
    threshold_choice,
    top_k_choice,
    transfer_factor,
    transfer_fixed_or_threshold,
)
from dllm_runtime.decoding.registry import (
    ReferenceDecoder,
    register_algorithm,
    register_reference,
)
from dllm_runtime.models.base import DiffusionModel, SpecialIds
from dllm_runtime.models.llada import llada_position_ids

CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class FastDLLMConfig:
    steps: int
    block_length: int
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    #: serving-only sampling filters at T > 0 (no upstream equivalent; None = off)
    top_k: int | None = None
    top_p: float | None = None


class FastDLLMPolicy(DecodingPolicy):
    """Fast-dLLM block decoding with optional prefix/dual KV cache; state lives in `seq.state`."""

    name = "fast_dllm"

    def __init__(self, config: FastDLLMConfig, position_ids: PositionFn | None = None) -> None:
        if config.cache not in CACHE_MODES:
            raise ValueError(f"cache: must be one of {CACHE_MODES}, got {config.cache!r}")
        check_remasking(config.remasking)
        self.config = config
        self.position_ids = position_ids or llada_position_ids

    # ------------------------------------------------------------------ plan
    def init(self, seq: Sequence) -> None:
        nb, spb = check_blocks(seq.gen_length, self.config.block_length, self.config.steps)
        positions = canvas_positions(seq, self.position_ids)
        seq.state.update(num_blocks=nb, steps_per_block=spb, block=0, step=0, quota=[], positions=positions)

    def plan(self, seq: Sequence) -> ForwardSpec | None:
        st = seq.state
        if st["step"] > 0 and self._block_finished(seq):
            st["block"] += 1
            st["step"] = 0
        if st["block"] >= st["num_blocks"]:
            return None
        s, e = block_span(seq, self.config.block_length)
        if st["step"] == 0:
            open_block(seq, self.config.block_length)
            self._count_masks(seq)
            st["quota"] = quota(st["masks_in_block"], st["steps_per_block"])
            # with a cache, the block's first forward sees the whole canvas and (re)builds the cache
            return self._window(seq, 0, seq.length, store=self.config.cache != "none")
        if self.config.cache == "prefix":
            return self._window(seq, s, seq.length, use=True)
        if self.config.cache == "dual":
            return self._window(seq, s, e, use=True)
        return self._window(seq, 0, seq.length)

    def _window(self, seq: Sequence, lo: int, hi: int, store: bool = False, use: bool = False) -> ForwardSpec:
        valid = None if seq.valid is None else seq.valid[:, lo:hi]
        # the window's masked slots before the block's end, the only ones a step can commit (earlier
        # leftover masks included, as upstream); the forward computes their logits, and `commit`
        # reads them again (the canvas does not change in between)
        seq.state["candidates"] = masked_in_reach(seq, lo, hi)
        return ForwardSpec(
            input_ids=seq.canvas[:, lo:hi],
            positions=seq.state["positions"][:, lo:hi],
            valid=valid,
            offset=lo,
            use_cache=use,
            store_cache=store,
            logits_at=seq.state["candidates"][0],
        )

    # ------------------------------------------------------------------ commit
    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`logits` `(1, n, V)` at the window's `n` candidate slots (`ForwardSpec.logits_at`)."""
        st, cfg = seq.state, self.config
        step = st["step"]
        window = self._committed_window(seq)
        if cfg.cache == "prefix" and step > 0 and cfg.temperature > 0:
            # upstream draws Gumbel noise for the slice and discards it
            seq.rng.rand((1, window.shape[1], logits.shape[-1]), torch.float64, logits.device)
        mask = st["candidates"]  # the window `plan` chose, the same (lo, hi)
        x0, transfer = self._transfer(seq, logits[0], mask, window, step)
        apply_transfer(window, transfer, x0)  # a view: writes into seq.canvas
        st["step"] = step + 1  # whether the block is over is decided at the next `plan`
        self._count_masks(seq)

    def _count_masks(self, seq: Sequence) -> None:
        """Host copies of the masks left before the current block and inside it, from one read. The
        block is over when none is left inside; `commit_many` keeps them current without reading."""
        s, e = block_span(seq, self.config.block_length)
        masked = seq.canvas[0, :e] == seq.special.mask
        counts = torch.stack([masked[:s].sum(), masked[s:].sum()]).tolist()
        seq.state["masks_before"], seq.state["masks_in_block"] = counts

    def _committed_window(self, seq: Sequence) -> torch.Tensor:
        """The canvas view this step's forward covered (and `commit` writes into)."""
        if seq.state["step"] == 0 or self.config.cache == "none":
            return seq.canvas  # full canvas; earlier leftover masks stay eligible
        s, e = block_span(seq, self.config.block_length)
        return seq.canvas[:, s:] if self.config.cache == "prefix" else seq.canvas[:, s:e]

    @property
    def greedy(self) -> bool:
        """Argmax tokens committed by probability, by threshold or fixed quota: what `commit_many` batches."""
        cfg = self.config
        return cfg.temperature == 0 and cfg.remasking == "low_confidence" and cfg.factor is None

    @classmethod
    def commit_many(cls, items: list[tuple[DecodingPolicy, Sequence, torch.Tensor]]) -> list[int]:
        """Greedy sequences in one go (`GreedyCommits`): each applies its threshold rule or fixed quota.
        A fixed quota whose boundary is a tie is left to `commit` (the reference's sort decides)."""
        batch = GreedyCommits.collect(items, argmax_probability(torch.float64))  # upstream's float64 confidences
        if batch is None:
            return list(range(len(items)))
        chosen = {}
        for j, (policy, seq, probs) in enumerate(zip(batch.policies, batch.seqs, batch.confidence)):
            threshold = policy.config.threshold
            if threshold is not None:
                choice = threshold_choice(probs, threshold)
            else:
                choice = top_k_choice(probs, cls._quota(seq, len(probs)))
            if choice is not None:
                chosen[j] = choice
        windows = [policy._committed_window(seq) for policy, seq in zip(batch.policies, batch.seqs)]
        written = batch.write(chosen, [(w, seq.state["candidates"]) for w, seq in zip(windows, batch.seqs)])
        for j in written:
            st = batch.seqs[j].state
            # candidates are in canvas order: those before the block come first, in a window from 0
            before = st["masks_before"] if windows[j] is batch.seqs[j].canvas else 0
            st["masks_before"] -= sum(chosen[j][:before])
            st["masks_in_block"] -= sum(chosen[j][before:])
            st["step"] += 1
        return batch.left(written)

    def _block_finished(self, seq: Sequence) -> bool:
        """Upstream's loop exit: no mask left in the block (of ANY row), or the dual cache's step bound.

        `seq.state["batch_group"]` lists the sequences that replay one batched reference call: upstream
        keeps forwarding rows whose block is complete (they commit nothing) until every row's block
        is, and the conformance runner reproduces that. Checked at `plan` time, after every member
        has committed the previous step. Alone, the host count of the block's masks answers (no read).
        """
        st = seq.state
        if self.config.cache == "dual" and st["step"] >= st["steps_per_block"]:
            return True
        group = st.get("batch_group")
        if group:  # members may already count masks of their next block: read this block of each canvas
            s, e = block_span(seq, self.config.block_length)
            return not any(bool((m.canvas[0, s:e] == m.special.mask).any()) for m in group)
        return st["masks_in_block"] == 0

    @staticmethod
    def _quota(seq: Sequence, candidates: int) -> int:
        """The fixed rule's tokens for this step. The quota always completes a block within
        steps_per_block steps; past that (never reached by the reference) take every remaining
        mask so the loop cannot stall."""
        budget, step = seq.state["quota"], seq.state["step"]
        return budget[step] if step < len(budget) else candidates

    def _transfer(
        self, seq: Sequence, logits: torch.Tensor, mask: torch.Tensor, window: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.factor is not None:
            return transfer_factor(
                logits, cfg.temperature, cfg.remasking, mask, window, cfg.factor, seq.rng, cfg.top_k, cfg.top_p
            )
        k = None if cfg.threshold is not None else [self._quota(seq, int(mask.sum()))]
        return transfer_fixed_or_threshold(
            logits, cfg.temperature, cfg.remasking, mask, window, k, cfg.threshold, seq.rng, cfg.top_k, cfg.top_p
        )


# ---------------------------------------------------------------------------- registry entries
def from_params(params: DecodingParams, model: DiffusionModel) -> FastDLLMPolicy:
    """Serving: `algorithm="fast_dllm"` on a LLaDA-architecture model."""
    require_unshifted(model, "fast_dllm")
    factor = params.factor
    config = FastDLLMConfig(
        steps=params.resolved_steps(),
        block_length=params.effective_block_length(),
        temperature=float(params.temperature),
        remasking=params.remasking,
        threshold=None if factor is not None else params.resolved_threshold(),
        factor=factor,
        cache=params.cache,
        top_k=sampling_top_k(params),
        top_p=sampling_top_p(params),
    )
    return FastDLLMPolicy(config, model.position_ids)


_FAST_DEFAULTS: dict[str, Any] = dict(
    steps=128, gen_length=128, block_length=128, temperature=0.0, remasking="low_confidence",
    threshold=None, factor=None,
)  # fmt: skip


def _reference_factory(cache: str):
    def build(kwargs: dict[str, Any], special: SpecialIds) -> ReferenceDecoder:
        args, special = reference_kwargs(kwargs, _FAST_DEFAULTS, special)
        config = FastDLLMConfig(
            steps=int(args["steps"]),
            block_length=int(args["block_length"]),
            temperature=float(args["temperature"]),
            remasking=args["remasking"],
            threshold=None if args["threshold"] is None else float(args["threshold"]),
            factor=None if args["factor"] is None else float(args["factor"]),
            cache=cache,
        )
        return ReferenceDecoder(FastDLLMPolicy(config), int(args["gen_length"]), special)

    return build


register_algorithm("fast_dllm", from_params)
for _function, _cache in (
    ("generate", "none"),
    ("generate_with_prefix_cache", "prefix"),
    ("generate_with_dual_cache", "dual"),
):
    register_reference(f"NVlabs/Fast-dLLM v1/llada/generate.py::{_function}", _reference_factory(_cache))
