"""d3LLM decoders (hao-ai-lab/d3LLM): entropy-threshold block decoding and the multi-block pipeline.

Two decoders, each in a LLaDA and a Dream variant (ALGORITHMS.md §1.4):

* `D3LLMBlockwisePolicy` - one block at a time, a full forward per iteration until the block is
  complete. LLaDA (`generate(..., threshold)`): float64 entropy (+1e-12), rank 0 always taken, ranks
  >= 1 dropped iff `H > threshold` (so `<=` passes), tokens from `gumbel(logits, T)`. Dream
  (`diffusion_generate(alg="entropy_threshold")` -> `_sample`): entropy in the logits' dtype
  (+1e-8), rank 0 always, ranks >= 1 need `H < threshold` (strict).
* `D3LLMMultiBlockPolicy` - the "FullAttnMultiBlock" pipeline (`generate_multi_block`,
  `_sample_multi_block`): the next block is opened once the last one is `block_add_threshold`
  decoded, a block is "fully activated" once its predecessor is `decoded_token_threshold` decoded,
  every mask before the right-most active block end is eligible, the first fully activated block
  always makes progress, and with `early_stop` everything after the first decoded EOS becomes EOS.

The reference's loop counter (`nfe`) also counts an iteration that ends in the early-stop check
without a forward; `seq.nfe` counts real forwards, and `seq.state["reference_nfe"]` holds the
reference's count for the conformance runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from dllm_runtime.decoding.base import DecodingPolicy, ForwardSpec, PositionFn, Sequence, block_span, canvas_positions
from dllm_runtime.decoding.dream import (
    reject_unused,
    rows_wanted,
    shift_right,
    slot_logits,
)
from dllm_runtime.decoding.params import DecodingParams, check_remasking
from dllm_runtime.decoding.primitives import apply_transfer, gumbel_argmax
from dllm_runtime.decoding.registry import ReferenceDecoder, ReferenceFactory, register_algorithm, register_reference
from dllm_runtime.models.base import DiffusionModel, SpecialIds
from dllm_runtime.models.dream import dream_position_ids
from dllm_runtime.models.llada import llada_position_ids

VARIANTS = ("llada", "dream")


@dataclass(frozen=True)
class D3LLMSettings:
    """Settings of both d3LLM decoders (defaults: the d3LLM chat scripts)."""

    threshold: float = 0.5
    block_length: int = 32
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    temperature: float = 0.0
    #: LLaDA variant only: "random" replaces entropies by float32 uniforms (reference option)
    remasking: str = "low_confidence"
    #: multi-block only: fill everything after the first decoded EOS with EOS and stop early
    early_stop: bool = False
    #: EOS id for early stop; None = the model's EOS (Dream reads it from its generation config)
    eos_id: int | None = None
    #: the reference's safety cap on loop iterations (`nfe > 10000: break`)
    max_iterations: int = 10000
    #: steps must split evenly over the blocks (reference check), otherwise unused
    steps: int | None = None
    #: multi-block only: d3LLM's delayed prefix KV cache; a decoded block enters the cache this many
    #: forwards after it is complete. None = no cache (a full forward every iteration)
    cache_delay_iter: int | None = None
    #: with the cache: every this many forwards a full forward refreshes the cached prefix (None: never)
    refresh_interval: int | None = None

    def validate(self) -> D3LLMSettings:
        if not 0 < self.threshold:
            raise ValueError(f"threshold: must be > 0 (an entropy bound in nats), got {self.threshold!r}")
        if not isinstance(self.block_length, int) or self.block_length < 1:
            raise ValueError(f"block_length: must be an integer >= 1, got {self.block_length!r}")
        for name in ("block_add_threshold", "decoded_token_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        check_remasking(self.remasking)
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations: must be >= 1, got {self.max_iterations!r}")
        if self.cache_delay_iter is not None and self.cache_delay_iter < 0:
            raise ValueError(f"cache_delay_iter: must be >= 0, got {self.cache_delay_iter!r}")
        if self.refresh_interval is not None and self.refresh_interval < 1:
            raise ValueError(f"refresh_interval: must be >= 1, got {self.refresh_interval!r}")
        return self


def entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    """`-sum p ln(p + 1e-12)` with `p = softmax(float64(logits))` (both LLaDA rules, Dream multi-block)."""
    p = F.softmax(logits.to(torch.float64), dim=-1)
    return -torch.sum(p * torch.log(p + 1e-12), dim=-1)


class _D3LLMPolicy(DecodingPolicy):
    """What both d3LLM decoders take: validated settings, the model family's rules, its RoPE rule."""

    name = "d3llm"

    def __init__(self, settings: D3LLMSettings, variant: str, position_ids: PositionFn) -> None:
        self.settings = settings.validate()
        if variant not in VARIANTS:
            raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.position_ids = position_ids


def _num_blocks(seq: Sequence, settings: D3LLMSettings) -> int:
    gen, bl = seq.gen_length, settings.block_length
    if gen < 1:
        raise ValueError("max_tokens: d3LLM needs at least one generation slot")
    if gen % bl:
        raise ValueError(f"block_length: the generation length {gen} must be a multiple of block_length {bl}")
    nb = gen // bl
    if settings.steps is not None and settings.steps % nb:
        raise ValueError(f"steps: must be a multiple of the number of blocks ({nb}), got {settings.steps}")
    return nb


# ------------------------------------------------------------------------------------ block-wise
class D3LLMBlockwisePolicy(_D3LLMPolicy):
    """Entropy-threshold decoding, one block after the other (`generate` / Dream `_sample`)."""

    def init(self, seq: Sequence) -> None:
        seq.state["num_blocks"] = _num_blocks(seq, self.settings)
        seq.state["block"] = 0
        seq.state["positions"] = canvas_positions(seq, self.position_ids)

    def plan(self, seq: Sequence) -> ForwardSpec | None:
        if seq.state["block"] >= seq.state["num_blocks"]:
            return None
        wanted = _rows_wanted(seq, self._eligible(seq), self.variant)
        return ForwardSpec(input_ids=seq.canvas, positions=seq.state["positions"], valid=seq.valid, logits_at=wanted)

    def _eligible(self, seq: Sequence) -> torch.Tensor:
        """`(1, L)` bool: the masked slots of the current block and before it."""
        _, hi = block_span(seq, self.settings.block_length)
        eligible = seq.canvas == seq.special.mask
        eligible[:, hi:] = False
        return eligible

    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`logits` `(R, n, V)` at the rows `plan` asked for (the canvas has not changed since)."""
        lo, hi = block_span(seq, self.settings.block_length)
        x = seq.canvas
        eligible = self._eligible(seq)
        wanted = _rows_wanted(seq, eligible, self.variant)
        if self.variant == "llada":
            x0, transfer = _llada_entropy_transfer(seq, logits, eligible, wanted, self.settings)
        else:
            x0, transfer = self._dream_transfer(seq, logits, eligible, wanted, lo, hi)
        apply_transfer(x, transfer, x0)
        if not bool((x[:, lo:hi] == seq.special.mask).any()):
            seq.state["block"] += 1

    def _dream_transfer(
        self, seq: Sequence, logits: torch.Tensor, eligible: torch.Tensor, wanted: torch.Tensor, lo: int, hi: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dream `_sample` on raw logits: entropy in the logits' dtype over the eligible rows, strict `<`."""
        cfg, x, mask_id = self.settings, seq.canvas, seq.special.mask
        rows = slot_logits(logits, eligible[0].nonzero().squeeze(1), True, wanted)
        probs = torch.softmax(rows, dim=-1)
        entropy = -torch.sum(probs * torch.log(probs + 1e-8), dim=-1)
        if cfg.temperature == 0:
            tokens = torch.argmax(rows, dim=-1)
        else:
            tokens = seq.rng.multinomial(torch.softmax(rows / cfg.temperature, dim=-1), 1).squeeze(-1)
        x0 = torch.full_like(x, mask_id)
        x0[eligible] = tokens
        full_entropy = torch.full(x.shape, torch.inf, dtype=logits.dtype, device=x.device)
        full_entropy[eligible] = entropy
        k = int((x[:, lo:hi] == mask_id).sum())
        transfer = torch.zeros_like(x, dtype=torch.bool)
        if k > 0:
            values, idx = torch.topk(full_entropy, k, largest=False)
            keep = values[0] < cfg.threshold
            keep[0] = True  # rank 0 is always transferred
            transfer[0, idx[0][keep]] = True
        return x0, transfer


def _rows_wanted(seq: Sequence, eligible: torch.Tensor, variant: str) -> torch.Tensor:
    """`ForwardSpec.logits_at`: the rows that predict the eligible slots (shifted for Dream)."""
    return rows_wanted(eligible[0].nonzero().squeeze(1), seq.length, shift=variant == "dream")


def _llada_entropy_transfer(
    seq: Sequence,
    logits: torch.Tensor,
    eligible: torch.Tensor,
    wanted: torch.Tensor | None,
    cfg: D3LLMSettings,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d3LLM-LLaDA `get_transfer_index_entropy` with a threshold (B = 1).

    The reference computes argmax and float64 entropy over the whole canvas; only the eligible
    slots are ever read, so only their logits are computed (`wanted`; a full `(L, V)` float64
    softmax would cost GBs for a 150k vocabulary). RNG order is kept: the Gumbel draw (T > 0, full
    `(1, L, V)` shape, as the reference draws it) first, then the `random` remasking uniforms `(1, L)`.
    """
    x = seq.canvas
    slots = eligible[0].nonzero().squeeze(1)
    selected = slot_logits(logits, slots, False, wanted, window)
    x0 = x.clone()
    full_shape = (1, x.shape[1], selected.shape[-1])
    x0[0, slots] = gumbel_argmax(selected, cfg.temperature, seq.rng, full_shape, eligible)
    if cfg.remasking == "low_confidence":
        entropy = torch.full(x.shape, torch.inf, dtype=torch.float64, device=x.device)
        entropy[0, slots] = entropy_f64(selected)
    else:
        entropy = seq.rng.rand(tuple(x.shape), torch.float32, x.device)
    for_selection = torch.where(eligible, entropy, torch.inf)
    transfer = torch.zeros_like(x, dtype=torch.bool)
    k = int(slots.numel())
    if k > 0:
        _, idx = torch.topk(for_selection[0], k, largest=False)
        keep = entropy[0, idx] <= cfg.threshold  # dropped iff H > threshold
        keep[0] = True  # rank 0 is always transferred
        transfer[0, idx[keep]] = True
    return x0, transfer


# ----------------------------------------------------------------------------------- multi-block
@dataclass
class _Block:
    start: int
    end: int
    mask_count: int
    total: int
    #: the reference's `is_complete`, which means "fully activated", not "decoded"
    active: bool
    #: delayed cache: the forward count at which the block was first seen without masks
    completed_at: int | None = None
    #: delayed cache: in the cache (or, for the early-stop EOS tail, never to be put there)
    cached: bool = False

    def progress(self) -> float:
        return 1 - self.mask_count / self.total


@dataclass
class _MultiBlockState:
    blocks: list[_Block]
    num_blocks: int
    iterations: int = 0
    done: bool = False
    #: eligible masks of the pending forward (`mask_index_for_decode`)
    eligible: torch.Tensor | None = None
    #: its `ForwardSpec.logits_at` (None: every row)
    wanted: torch.Tensor | None = None
    #: first canvas position of the pending forward's window (> 0 only when it reads the cache)
    window: int = 0
    #: delayed cache: canvas `[0, cache_len)` has frozen K/V in `seq.kv`; `grow_to` is what the
    #: pending forward adds to it
    cache_len: int = 0
    grow_to: int = 0
    history: list[int] = field(default_factory=list)

    @property
    def next_id(self) -> int:
        return len(self.blocks)


class D3LLMMultiBlockPolicy(_D3LLMPolicy):
    """d3LLM's pipelined multi-block decoder without KV cache (`generate_multi_block`)."""

    # -------------------------------------------------------------- state
    def init(self, seq: Sequence) -> None:
        cfg = self.settings
        nb = _num_blocks(seq, cfg)
        p = seq.prompt_len
        first = _Block(p, p + cfg.block_length, cfg.block_length, cfg.block_length, 1.0 >= cfg.decoded_token_threshold)
        seq.state["multi_block"] = _MultiBlockState(blocks=[_Block(0, p, 0, p, True), first], num_blocks=nb)
        seq.state["positions"] = canvas_positions(seq, self.position_ids)
        seq.state["reference_nfe"] = 0

    def _eos(self, seq: Sequence) -> int:
        return self.settings.eos_id if self.settings.eos_id is not None else seq.special.eos

    def _stop(self, seq: Sequence, st: _MultiBlockState) -> None:
        st.done = True
        seq.state["reference_nfe"] = st.iterations

    # -------------------------------------------------------------- before the forward
    def plan(self, seq: Sequence) -> ForwardSpec | None:
        cfg = self.settings
        st: _MultiBlockState = seq.state["multi_block"]
        if st.done:
            return None
        x, p, mask_id = seq.canvas, seq.prompt_len, seq.special.mask
        masked = x == mask_id  # taken before the early-stop fill, as the reference does
        if not bool(masked[:, p:].any()) and st.next_id > st.num_blocks:
            self._stop(seq, st)
            return None
        if st.iterations > cfg.max_iterations:  # the reference breaks after forward 10001
            self._stop(seq, st)
            return None
        st.iterations += 1
        seq.state["reference_nfe"] = st.iterations

        has_eos = False
        if cfg.early_stop:
            has_eos = self._early_stop(seq, st)
            if has_eos and not bool((x[:, p:] == mask_id).any()):
                self._stop(seq, st)
                return None

        for k in range(1, len(st.blocks)):
            block = st.blocks[k]
            if not block.active and st.blocks[k - 1].progress() >= cfg.decoded_token_threshold:
                block.active = True

        if st.next_id <= st.num_blocks and not has_eos:
            last = st.blocks[-1]
            if len(st.blocks) > 1 and (last.progress() >= cfg.block_add_threshold or last.mask_count == 0):
                start = p + (st.next_id - 1) * cfg.block_length
                end = min(start + cfg.block_length, seq.length)
                if end > start:
                    count = int((x[:, start:end] == mask_id).sum())
                    prev_ready = st.blocks[-1].progress() >= cfg.decoded_token_threshold
                    st.blocks.append(_Block(start, end, count, end - start, prev_ready))

        rightmost = 0
        for k, block in enumerate(st.blocks):
            if block.active or block.mask_count > 0:
                rightmost = k
        if rightmost == 0:
            self._stop(seq, st)
            return None
        active_end = st.blocks[rightmost].end
        use_cache = store_cache = False
        lo = 0
        if cfg.cache_delay_iter is not None:
            if st.cache_len >= active_end:  # the reference's "no block needs forwarding" exit
                self._stop(seq, st)
                return None
            lo, use_cache, store_cache = self._plan_cache(st)
        eligible = masked.clone()
        eligible[:, active_end:] = False
        eligible[:, :lo] = False  # cached positions have no logits (and hold no masks)
        st.eligible = eligible
        shift = int(self.variant == "dream")
        # Dream-family models predict slot p from row p-1: a window starts one row before its first slot
        st.window = window = max(lo - shift, 0)
        # Dream at T > 0 samples every position (one `multinomial (L, 1)`), so it needs every row
        full = self.variant == "dream" and cfg.temperature > 0 and window == 0
        slots = eligible[0].nonzero().squeeze(1) - window
        st.wanted = None if full else rows_wanted(slots, seq.length - window, shift=bool(shift))
        return ForwardSpec(
            input_ids=seq.canvas[:, window:],
            positions=seq.state["positions"][:, window:],
            valid=None if seq.valid is None else seq.valid[:, window:],
            offset=window,
            use_cache=use_cache,
            store_cache=store_cache,
            logits_at=st.wanted,
        )

    def _plan_cache(self, st: _MultiBlockState) -> tuple[int, bool, bool]:
        """d3LLM's delayed cache (`generate_multi_block_kv_cache`): `(window start, read, write)`.

        A block enters the cache `cache_delay_iter` forwards after it is first seen decoded, in order
        (a block still stabilising holds back the ones after it). A forward that adds blocks runs from
        the old cache end, reading the cache and storing its K/V; while a block is stabilising (or on
        the periodic refresh) a full forward rewrites the cached prefix's K/V from the current canvas;
        otherwise the forward runs from the cache end and reads the frozen prefix. Unlike upstream, a
        refresh keeps exactly the cached prefix (upstream keeps up to the stabilising block's start,
        which is the same position whenever every earlier block is cached, its usual state).
        """
        cfg = self.settings
        grow_to, stabilising = st.cache_len, False
        for block in st.blocks:
            if block.end <= st.cache_len:
                continue
            if block.mask_count:
                break
            if block.completed_at is None:
                block.completed_at = st.iterations
            if st.iterations - block.completed_at < cfg.cache_delay_iter:
                stabilising = not block.cached
                break
            if not block.cached:
                block.cached = True
                grow_to = block.end
        has_cache = st.cache_len > 0
        st.grow_to = grow_to
        periodic = cfg.refresh_interval is not None and st.iterations % cfg.refresh_interval == 0
        if grow_to > st.cache_len:
            return st.cache_len, has_cache, True
        if has_cache and not (stabilising or periodic):
            return st.cache_len, True, False
        return 0, False, has_cache

    def _early_stop(self, seq: Sequence, st: _MultiBlockState) -> bool:
        """`handle_early_stop` + the block bookkeeping that follows it; True when an EOS was found."""
        x, p, mask_id, eos = seq.canvas, seq.prompt_len, seq.special.mask, self._eos(seq)
        hits = (x[0, p:] == eos).nonzero()
        if hits.numel() == 0:
            return False
        e = p + int(hits[0, 0])
        x[:, e + 1 :] = eos
        for block in st.blocks[1:]:
            if block.start > e:
                if block.mask_count != 0:
                    block.mask_count, block.active = 0, True
            elif block.end > e >= block.start:
                before = int((x[:, block.start : e + 1] == mask_id).sum())
                if before != block.mask_count:
                    block.mask_count = before
                    if before == 0:
                        block.active = True
        if self.variant == "dream":  # Dream recounts every block from the canvas
            for block in st.blocks[1:]:
                actual = int((x[:, block.start : block.end] == mask_id).sum())
                if actual != block.mask_count:
                    block.mask_count = actual
                    if actual == 0:
                        block.active = True
        while st.next_id <= st.num_blocks:
            start = p + (st.next_id - 1) * self.settings.block_length
            if start <= e:
                break
            end = min(start + self.settings.block_length, seq.length)
            st.blocks.append(_Block(start, end, 0, end - start, True, cached=True))  # EOS tail: never cached
        return True

    # -------------------------------------------------------------- after the forward
    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """`logits` `(R, n, V)` at the rows `plan` asked for (`st.wanted`), or `(R, L, V)` when None."""
        cfg = self.settings
        st: _MultiBlockState = seq.state["multi_block"]
        x, eligible, wanted, start = seq.canvas, st.eligible, st.wanted, st.window
        assert eligible is not None, "commit without a planned forward"
        st.cache_len = max(st.cache_len, st.grow_to)  # the forward has stored the blocks it added
        if self.variant == "llada":
            x0, transfer = _llada_entropy_transfer(seq, logits, eligible, wanted, cfg, start)
        else:
            # float64 entropy and argmax only where a slot can be committed (the reference computes
            # them for the whole canvas); at T > 0 every position is sampled, as the reference's one
            # `multinomial (L, 1)` draw does, so the RNG stream stays the same (a forward that reads
            # the cache has no rows for the cached prefix: it samples the eligible slots only)
            slots = eligible[0].nonzero().squeeze(1)
            rows = slot_logits(logits, slots, True, wanted, start)  # == shift_right(logits)[0, slots]
            entropy = torch.full(x.shape, torch.inf, dtype=torch.float64, device=x.device)
            entropy[0, slots] = entropy_f64(rows)
            x0 = x.clone()
            if cfg.temperature > 0 and wanted is None:
                probs = F.softmax(shift_right(logits) / cfg.temperature, dim=-1)
                x0 = seq.rng.multinomial(probs.view(-1, probs.shape[-1]), 1).view(x.shape)
            elif cfg.temperature > 0:
                x0[0, slots] = seq.rng.multinomial(F.softmax(rows / cfg.temperature, dim=-1), 1).squeeze(-1)
            else:
                x0[0, slots] = torch.argmax(rows, dim=-1)
            transfer = (entropy < cfg.threshold) & eligible

        forced = next((b for b in st.blocks[1:] if b.active and b.mask_count > 0), None)
        if forced is not None and not bool(transfer[:, forced.start : forced.end].any()):
            open_slots = forced.start + eligible[0, forced.start : forced.end].nonzero().squeeze(1)
            if open_slots.numel():  # guard: stale counts would otherwise force a committed slot
                if self.variant == "llada":
                    open_logits = slot_logits(logits, open_slots, False, wanted, start)
                    block_entropy = entropy_f64(open_logits)
                else:
                    block_entropy = entropy[0, open_slots]
                pick = int(block_entropy.argmin())  # first of equals, as argmin over the masked block
                best = int(open_slots[pick])
                transfer[0, best] = True
                if self.variant == "llada":  # LLaDA re-picks the raw argmax; Dream keeps x0
                    x0[0, best] = torch.argmax(open_logits[pick], dim=-1)

        apply_transfer(x, transfer, x0)
        for block in st.blocks[1:]:
            if block.mask_count > 0:
                decoded = int(transfer[:, block.start : block.end].sum())
                block.mask_count -= decoded
        st.history.append(int(transfer.sum()))
        st.eligible = st.wanted = None


# ---------------------------------------------------------------------------------- registration
def _policy_from_params(params: DecodingParams, model: DiffusionModel) -> DecodingPolicy:
    """Serving: the multi-block pipeline (the d3LLM chat default). `block_add_threshold =
    decoded_token_threshold = 1.0` turns it into block-by-block decoding (LLaDA: token-identical to
    `generate`). The variant follows the model: right-shifted logits mean the Dream rules.
    """
    variant = "dream" if model.shift_logits else "llada"
    unused = {"top_p": "samples from the full distribution", "top_k": "samples from the full distribution",
              "factor": "uses an entropy threshold"}
    if variant == "dream":
        unused["remasking"] = "ranks slots by entropy only"
    reject_unused(params, "d3llm", **unused)
    settings = D3LLMSettings(
        threshold=params.resolved_threshold(),
        block_length=params.effective_block_length(),
        block_add_threshold=params.block_add_threshold,
        decoded_token_threshold=params.decoded_token_threshold,
        temperature=params.temperature,
        remasking=params.remasking,
        early_stop=params.early_stop,
        cache_delay_iter=params.cache_delay_iter if params.cache == "prefix" else None,
        refresh_interval=params.cache_refresh_interval,
    )
    return D3LLMMultiBlockPolicy(settings, variant, model.position_ids)


def _reference(
    variant: str, multi_block: bool, length_key: str, block_key: str, defaults: dict[str, Any], allowed: set[str]
) -> ReferenceFactory:
    """A conformance factory for one d3LLM entry point (its own argument names and defaults)."""

    def factory(kwargs: dict[str, Any], special: SpecialIds) -> ReferenceDecoder:
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"{unknown[0]}: d3LLM argument not supported by the d3llm policies")
        args = {**defaults, **kwargs}
        if variant == "dream" and args.get("alg") != "entropy_threshold":
            raise ValueError(f"alg: only 'entropy_threshold' is a d3LLM decoder, got {args.get('alg')!r}")
        if args.get("cache_delay_iter", 10000) < 10000:  # served (cache="prefix"), but no golden case
            raise ValueError("cache_delay_iter: the delayed KV cache has no reference case to reproduce")
        if args.get("threshold") is None:
            if not multi_block:  # LLaDA `generate` without a threshold is the plain quota sampler
                raise ValueError("threshold: required (without it d3LLM `generate` is LLaDA's quota sampler)")
            args["threshold"] = 999.0  # the reference's stand-in for "no threshold"
        if "mask_id" in args:
            special = replace(special, mask=int(args["mask_id"]))
        eos = args.get("eos_token_id")  # LLaDA passes it; Dream reads its generation config
        settings = D3LLMSettings(
            threshold=float(args["threshold"]),
            block_length=int(args[block_key]),
            block_add_threshold=float(args.get("block_add_threshold", 0.5)),
            decoded_token_threshold=float(args.get("decoded_token_threshold", 0.5)),
            temperature=float(args.get("temperature") or 0.0),
            remasking=args.get("remasking", "low_confidence"),
            early_stop=bool(args.get("early_stop", False)),
            eos_id=int(eos) if eos is not None else None,
            steps=None if multi_block else int(args["steps"]),
        )
        cls = D3LLMMultiBlockPolicy if multi_block else D3LLMBlockwisePolicy
        positions = dream_position_ids if variant == "dream" else llada_position_ids
        policy = cls(settings, variant, positions)
        return ReferenceDecoder(policy=policy, gen_length=int(args[length_key]), special=special)

    return factory


_LLADA_COMMON = {"steps", "temperature", "remasking", "mask_id", "threshold"}
_DREAM_COMMON = {"steps", "temperature", "alg", "threshold", "max_new_tokens", "top_p", "top_k", "alg_temp", "eps"}
_MULTI = {"block_size", "block_add_threshold", "decoded_token_threshold", "early_stop"}

register_algorithm("d3llm", _policy_from_params)
_D3LLM = "hao-ai-lab/d3LLM d3llm/"
register_reference(
    _D3LLM + "d3llm_LLaDA/d3llm_llada_generate_util.py::generate",
    _reference(
        "llada", False, "gen_length", "block_length",
        {"steps": 128, "gen_length": 128, "block_length": 128, "threshold": None},
        _LLADA_COMMON | {"gen_length", "block_length"},
    ),
)
register_reference(
    _D3LLM + "d3llm_LLaDA/d3llm_llada_generate_util.py::generate_multi_block",
    _reference(
        "llada", True, "max_new_tokens", "block_size",
        {"max_new_tokens": 512, "block_size": 32, "threshold": 0.5},
        _LLADA_COMMON | _MULTI | {"max_new_tokens", "eos_token_id"},
    ),
)
register_reference(
    _D3LLM + "d3llm_DREAM/d3llm_dream_generate_util.py::DreamGenerationMixin.diffusion_generate",
    _reference(
        "dream", False, "max_new_tokens", "block_length",
        {"steps": 512, "block_length": 32, "threshold": 0.5, "alg": "origin"},
        _DREAM_COMMON | {"block_length"},
    ),
)
register_reference(
    _D3LLM + "d3llm_DREAM/d3llm_dream_generate_util.py::DreamGenerationMixin.generate_multi_block",
    _reference(
        "dream", True, "max_new_tokens", "block_size",
        {"block_size": 32, "threshold": 0.9, "alg": "origin"},
        _DREAM_COMMON | _MULTI | {"cache_delay_iter"},
    ),
)
