"""The contract between decoding policies and the step loop that drives them.

A policy is a small object that holds no model: for one sequence it says what the next forward must
see (`plan`) and, given that forward's logits, which masked positions to commit and to what
(`commit`). `dllm_runtime.engine.step.run_step` runs the planned forwards of many sequences as one
batched model call; the conformance runner, `dllm-serve generate` and the serving engine all use
that one loop, so there is no second "reference" decoding loop to drift from the first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from dllm_runtime.models.base import SpecialIds

#: a model's RoPE rule: `valid` `(B, L)` bool (non-pad) -> positions `(B, L)`; policies take it as
#: a function so the conformance runner can decode without a model at hand
PositionFn = Callable[[torch.Tensor], torch.Tensor]


class RandomSource:
    """Every random draw a policy makes goes through here, in the reference's call order.

    Backed by a per-request `torch.Generator`, so a request's draws do not depend on what else is in
    the batch. Seeded on CPU, the stream equals `torch.manual_seed(seed)` + the reference's global
    draws, which is how the golden sampling cases are reproduced. Tests may subclass it to inject
    saved draws (the seam named in the runtime-core issue).
    """

    def __init__(self, seed: int | None, device: torch.device | str = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """U[0,1) like `torch.rand`/`torch.rand_like` (Gumbel noise, random remasking, Dream coins)."""
        return torch.rand(shape, dtype=dtype, device=device, generator=self.generator)

    def multinomial(self, probs: torch.Tensor, num_samples: int, replacement: bool = False) -> torch.Tensor:
        """`torch.multinomial` (Dream alg_temp position selection, d3LLM-Dream sampling)."""
        return torch.multinomial(probs, num_samples, replacement=replacement, generator=self.generator)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """`torch.distributions.Categorical(probs).sample()`: one id per row of `probs` `(N, V)`.

        Categorical.sample is `multinomial(probs, 1, True)`; calling it through our generator keeps
        the same stream as the reference's global-RNG call.
        """
        probs_2d = probs.reshape(-1, probs.size(-1))
        return torch.multinomial(probs_2d, 1, True, generator=self.generator).reshape(probs.shape[:-1])


@dataclass
class ForwardSpec:
    """What one sequence needs from the next batched forward.

    `input_ids` `(R, T)`: R rows (1, or 2 for CFG's conditional + unconditional branch) of the canvas
    window `[offset, offset + T)`. With `use_cache`, the rows also attend to the sequence's stored
    keys outside that window (`kv[:offset] ++ new ++ kv[offset+T:]`, the Fast-dLLM prefix and dual
    cache orders). With `store_cache`, the forward's post-RoPE k/v replace the sequence's cache for
    canvas positions `[offset, offset + T)` (a full-canvas forward with `offset=0` builds it).
    With `logits_at` `(T,)` bool, `commit` receives logits `(R, n, V)` for the `n` marked window
    positions only (in order) instead of `(R, T, V)`: the LM head then runs on those alone.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None  # (R, T) bool, False = left pad (key masked)
    offset: int = 0
    use_cache: bool = False
    store_cache: bool = False
    logits_at: torch.Tensor | None = None


@dataclass
class KVCache:
    """Per-sequence block KV cache: post-RoPE keys/values of every canvas position, per layer.

    Token-major, so the step loop gathers every row's keys of a layer with one `index_select`: row r's
    canvas position p is at `r * L + p`."""

    keys: list[torch.Tensor]  # per layer (R * L, Hkv, D)
    values: list[torch.Tensor]
    valid: torch.Tensor  # (R, L) bool

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class Sequence:
    """One request's canvas and decoding state, shared by its policy and the step loop.

    `canvas` is `(1, L)` = prompt (possibly left-padded) + generation slots, so policies read like
    the batch-1 reference code they reproduce.
    """

    canvas: torch.Tensor
    prompt_len: int
    special: SpecialIds
    rng: RandomSource
    valid: torch.Tensor | None = None  # (1, L) bool; None = no padding
    kv: KVCache | None = None
    nfe: int = 0
    finished: bool = False
    #: free-form per-policy state (block index, step index, quotas …)
    state: dict = field(default_factory=dict)
    #: (canvas, view of its generation slots), see `generation`
    _generation: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.canvas.shape[1]

    @property
    def gen_length(self) -> int:
        return self.length - self.prompt_len

    def cache_bytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def generation(self) -> torch.Tensor:
        """The canvas's generation slots `(gen_length,)`, a view made once per canvas: the engine
        reads every sequence's after every step, and making a view costs ~2.5 us each time."""
        if self._generation is None or self._generation[0] is not self.canvas:
            self._generation = (self.canvas, self.canvas[0, self.prompt_len :])
        return self._generation[1]


def generation_ids(seqs: list[Sequence]) -> list[list[int]]:
    """Every sequence's generation slots (masks included) as Python ints, all read in one copy.

    The engine looks at every running sequence after every step (what is masked, what is newly
    final); one read for the batch instead of a few small ops and a host sync per sequence.
    """
    if not seqs:
        return []
    views = [s.generation() for s in seqs]
    flat = torch.cat(views).tolist()
    starts = [0, *accumulate(v.shape[0] for v in views)]
    return [flat[lo:hi] for lo, hi in zip(starts, starts[1:])]


def canvas_positions(seq: Sequence, position_ids: PositionFn) -> torch.Tensor:
    """RoPE positions of the whole canvas from the model's rule (Dream skips left pads)."""
    valid = seq.valid if seq.valid is not None else torch.ones_like(seq.canvas, dtype=torch.bool)
    return position_ids(valid)


def block_span(seq: Sequence, block_length: int) -> tuple[int, int]:
    """Canvas slice `[lo, hi)` of the semi-autoregressive block `seq.state["block"]` (after the prompt)."""
    lo = seq.prompt_len + seq.state["block"] * block_length
    return lo, lo + block_length


def open_block(seq: Sequence, block_length: int) -> None:
    """At a block's first step: the canvas a slot must equal to be a candidate (`seq.state["reach"]`):
    the mask id up to the block's end, -1 (no token) after it. Each step then finds its candidates
    with one comparison (`masked_in_reach`), not a comparison and an `and`."""
    _, hi = block_span(seq, block_length)
    reach = seq.canvas.new_full((1, seq.length), seq.special.mask)
    reach[:, hi:] = -1
    seq.state["reach"] = reach


def masked_in_reach(seq: Sequence, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """`(1, hi - lo)` bool: the still-masked slots of the canvas window `[lo, hi)` that lie before
    the current block's end (see `open_block`), i.e. the slots a semi-AR step may commit."""
    if lo == 0 and hi is None:
        return torch.eq(seq.canvas, seq.state["reach"])
    return torch.eq(seq.canvas[:, lo:hi], seq.state["reach"][:, lo:hi])


class DecodingPolicy(ABC):
    """Decides, step by step, which masked positions of one sequence to commit."""

    #: short name used in flags, metrics and logs (e.g. "llada", "fast_dllm", "dream", "d3llm")
    name: str = "policy"

    def init(self, seq: Sequence) -> None:
        """Called once before the first `plan` (validate settings against the canvas, set state)."""

    @abstractmethod
    def plan(self, seq: Sequence) -> ForwardSpec | None:
        """The next forward this sequence needs, or None when decoding is complete."""

    @abstractmethod
    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Apply the raw (unshifted) logits `(R, T, V)` of the planned forward to `seq.canvas`."""

    @classmethod
    def commit_many(cls, items: list[tuple[DecodingPolicy, Sequence, torch.Tensor]]) -> list[int]:
        """Commit several sequences of this policy class at once; returns the indices of `items` it
        left for `commit`.

        Why: a step's commits are a dozen small tensor ops per sequence, which at batch 16-32 cost
        as much as a small forward (and one kernel launch each on a GPU); a class can do the common
        case for the whole batch in a few ops. An override must leave every sequence exactly as
        `commit` would, and must not write anything before its last op can fail: the step loop
        retries the items one by one with `commit` when it raises. Subclasses that change `commit`
        must override this too. The default does nothing here.
        """
        return list(range(len(items)))
