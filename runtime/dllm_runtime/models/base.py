"""The contract between models, decoders and the engine.

A diffusion LM is a bidirectional mask predictor: one forward over a window of the canvas gives
logits for every position in it. Models own projections, RoPE and MLPs; *how* a layer attends
(padding masks, block KV caches, batching several sequences, flash-attn varlen) is delegated to an
`AttentionContext`, so the model code stays as small as the reference forwards in ALGORITHMS.md §2
and one model serves the decoders, the conformance runner and the batching engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the decoders need; always read from config/tokenizer, never literals."""

    mask: int
    eos: int
    pad: int
    eot: int | None = None  # LLaDA <|eot_id|>, Dream <|im_end|>
    bos: int | None = None

    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer when they appear in the committed prefix (early stop)."""
        return tuple(i for i in (self.eos, self.eot) if i is not None)


class AttentionContext(Protocol):
    """Decides which keys each query sees for one forward.

    `attend` is called once per layer with post-RoPE tensors of the *new* tokens of this forward:
    q `(B, Hq, T, D)`, k/v `(B, Hkv, T, D)` (GQA heads not yet repeated). It returns the attention
    output `(B, Hq, T, D)`. A cache context may splice cached keys in front of / around the new ones
    and may store the new k/v for later forwards.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class DiffusionModel(nn.Module):
    """Base class of the native models (LLaDA, Dream)."""

    model_type: str
    special_ids: SpecialIds
    #: Dream predicts position p from the state at p-1 (AR initialisation): decoders shift logits
    #: right by one (`logits[:, :1], logits[:, :-1]`). LLaDA: False.
    shift_logits: bool
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        """RoPE positions `(B, L)` for a canvas whose `valid` `(B, L)` bool marks non-pad tokens.

        LLaDA keeps 0..L-1 even with left padding; Dream skips pads (cumsum(valid) - 1, pads -> 1).
        """
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw (unshifted) logits `(B, T, V)` for `input_ids` `(B, T)` at RoPE `positions` `(B, T)`.

        `attention=None` means full bidirectional attention over exactly these tokens.
        `logits_index` `(N,)` long: flat indices into the `B·T` positions whose logits are wanted;
        the result is then `(N, V)` (see `select_logits`). A decoder reads only the masked slots of
        its current block, and the LM head is the largest matmul of a small model and the largest
        activation of a big one (`T × V` per row), so the step loop asks for those positions only.
        """
        raise NotImplementedError


def select_logits(logits: torch.Tensor, logits_index: torch.Tensor | None) -> torch.Tensor:
    """`(B, T, V)` logits → `(N, V)` at the flat positions `logits_index` (None: unchanged).

    For model wrappers (recording, replaying, test doubles) that compute every position first.
    """
    if logits_index is None:
        return logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, logits_index)
