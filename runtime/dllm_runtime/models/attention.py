"""Attention kernels (SDPA, varlen FlashAttention) and the two simplest attention contexts (full, key-padding mask)."""

from __future__ import annotations

from collections.abc import Callable

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
    """Whether a varlen kernel is there: flash-attn's, else PyTorch's own (both CUDA fp16/bf16 only)."""
    return _varlen_kernel() is not None


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
    is needed. GQA (Hkv < Hq) is allowed. Returns `(sum T_i, Hq, D)`. Needs `varlen_available()`.
    """
    kernel = _varlen_kernel()
    if kernel is None:
        raise RuntimeError("no varlen attention kernel: install flash-attn or use torch >= 2.10")
    return kernel(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False
    )


def load_flash_attn(name: str):  # pragma: no cover - depends on an optional GPU package
    """A function of the optional flash-attn package, or None where it is missing (CPU machines, tests)."""
    try:
        import flash_attn  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import time
        return None
    return getattr(flash_attn, name, None)


def torch_varlen_func() -> Callable[..., torch.Tensor] | None:
    """PyTorch's own varlen FlashAttention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10)
    behind flash-attn's calling convention, or None on an older torch.

    Why: flash-attn is a large CUDA build that GPU images rarely carry, while every recent torch
    wheel ships this kernel. Its signature changed between releases (GQA only from 2.12, and not on
    its cuDNN backend), so only the arguments every release takes are passed, and kv heads are
    repeated for GQA as `sdpa` does.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    def call(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool = False,
    ) -> torch.Tensor:
        if causal:
            raise ValueError("diffusion LMs attend bidirectionally: causal varlen attention is not used")
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    return call


_UNRESOLVED = object()
#: the varlen kernel, looked up on first use (`_varlen_kernel`); tests and bench/step_host.py replace it
_flash_attn_varlen_func: Callable[..., torch.Tensor] | None | object = _UNRESOLVED


def _varlen_kernel() -> Callable[..., torch.Tensor] | None:
    """Look the kernel up when a GPU forward first asks, not at import: importing torch's varlen module
    pulls in torch._dynamo (~1.3 s), which CPU processes (tests, the CLI, CPU serving) never need."""
    global _flash_attn_varlen_func
    if _flash_attn_varlen_func is _UNRESOLVED:
        _flash_attn_varlen_func = load_flash_attn("flash_attn_varlen_func") or torch_varlen_func()
    return _flash_attn_varlen_func  # type: ignore[return-value]
