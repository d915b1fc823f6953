"""Attention kernels and the two simplest attention contexts (full, key-padding mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention; `key_valid` `(B, K)` bool hides padded keys from every query.

    Both LLaDA (additive `finfo.min` key bias) and Dream (bool 2-D mask) reduce to a key mask for
    every query that is ever read; masking keys only also keeps pad query rows finite (no NaN that
    could leak into reductions).
    """
    if k.shape[1] != q.shape[1]:  # GQA: repeat kv heads, as Qwen2/Dream do
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)


class KeyMaskAttention:
    """Full attention over this forward's tokens with padded keys hidden."""

    def __init__(self, key_valid: torch.Tensor | None) -> None:
        self.key_valid = key_valid

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, self.key_valid)
