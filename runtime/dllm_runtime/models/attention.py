"""Attention kernels (SDPA, flash-attn varlen) and the two simplest attention contexts (full, key-padding mask)."""

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


def varlen_available() -> bool:
    """Whether flash-attn's varlen kernel is installed (it runs on CUDA fp16/bf16 tensors only)."""
    return _flash_attn_varlen_func is not None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> torch.Tensor:
    """Bidirectional attention of many sequences packed end to end, in one kernel launch.

    `q` `(sum T_i, Hq, D)` and `k`/`v` `(sum K_i, Hkv, D)` hold sequence i at
    `cu_seqlens_*[i]:cu_seqlens_*[i + 1]` (int32, on q's device); keys hold no padding, so no mask
    is needed. GQA (Hkv < Hq) is native. Returns `(sum T_i, Hq, D)`. Needs `varlen_available()`.
    """
    if _flash_attn_varlen_func is None:
        raise RuntimeError("flash-attn is not installed: varlen attention is unavailable")
    return _flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False
    )


def load_flash_attn(name: str):  # pragma: no cover - depends on an optional GPU package
    """A function of the optional flash-attn package, or None where it is missing (CPU machines, tests)."""
    try:
        import flash_attn  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import time
        return None
    return getattr(flash_attn, name, None)


_flash_attn_varlen_func = load_flash_attn("flash_attn_varlen_func")
