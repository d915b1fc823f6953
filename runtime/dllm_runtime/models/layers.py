"""Building blocks shared by the native models: RMSNorm, rotary embeddings, SwiGLU, attention dispatch,
the attention half of a layer and the embed → layers → norm → head forward around the layers.

Numerics follow the released modeling code (ALGORITHMS.md §2) so that fp32 forwards match the golden
logits: RMSNorm statistics in fp32 and cast back before the weight; rotary angles in fp32 with the
rotate-half (non-interleaved) layout. Parameters stay in the model files under their released names;
the shared pieces here take them as arguments or reach them through `NativeModel.stack`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllm_runtime.models.attention import load_flash_attn, sdpa
from dllm_runtime.models.base import AttentionContext, DiffusionModel, SpecialIds


def token_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """`nn.Embedding`, left uninitialised when built on the meta device (the loader's skeleton, filled
    from safetensors). Why: its `normal_` init on meta runs a Python decomposition that imports
    torch._dynamo, ~1.3 s of every process's model load spent on numbers that are thrown away."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
    return nn.Embedding(num_embeddings, dim)


class RMSNorm(nn.Module):
    """`w ⊙ cast_back(x_fp32 · rsqrt(mean(x_fp32²) + eps))` (LLaDA and Qwen2 agree on this form).

    The normalisation is `F.rms_norm` on `x` as it comes: it upcasts half-precision input to fp32 itself
    and casts the result back, which on a CPU is exactly those ops (bit-identical, the tests pin it) and
    on a GPU one fused kernel with fp32 accumulation (no separate upcast and cast back), twice per layer.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class Rotary(nn.Module):
    """Rotary position embedding for arbitrary per-token positions `(B, T)`.

    Rotates queries and keys in one pass: `forward` takes them token-major and side by side,
    `(B, T, Hq + Hk, D)` (the projections' outputs joined), so a layer's RoPE is one set of elementwise
    ops (five launches instead of ten on a GPU) and the rotated heads keep the token-major layout the
    attention paths and KV caches read without a copy.

    `inv_freq` is recomputed per device on first use instead of being a buffer, so models can be
    built on the meta device and filled from safetensors without a buffer re-initialisation step.

    `full_precision=True` (LLaDA `rope_full_precision`) rotates q/k in fp32 and casts back;
    `False` (Qwen2/Dream) casts cos/sin to the activation dtype and rotates in that dtype.
    """

    def __init__(self, head_dim: int, theta: float, full_precision: bool) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.full_precision = full_precision
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        cached = self._inv_freq.get(device)
        if cached is None:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
            cached = 1.0 / (self.theta ** (exponent / self.head_dim))
            self._inv_freq[device] = cached
        return cached

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, T, 1, D)` tables for integer `positions` `(B, T)`: cos, and sin with its first half
        negated (see `_rotate`). Computed in fp32 and, unless `full_precision`, cast to the activations'
        `dtype` as the reference casts them; made once per forward, used by every layer."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq(positions.device)
        # the references take cos/sin of `cat([freqs, freqs])`: the same numbers twice (elementwise ops
        # round each element alike wherever it sits), so half the work, then the halves side by side
        cos_half, sin_half = freqs.cos()[:, :, None], freqs.sin()[:, :, None]
        cos, signed_sin = torch.cat([cos_half, cos_half], dim=-1), torch.cat([-sin_half, sin_half], dim=-1)
        if self.full_precision:
            return cos, signed_sin
        return cos.to(dtype), signed_sin.to(dtype)

    def forward(self, qk: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`qk` `(B, T, H, D)`: query and key heads of every token, rotated alike (RoPE is per head)."""
        cos, sin = cos_sin
        if self.full_precision:
            return _rotate(qk.float(), cos, sin).type_as(qk)
        return _rotate(qk, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` (rotate_half = `cat(-x2, x1)`), as `x * cos + roll(x) * signed_sin`
    with `signed_sin = cat(-sin1, sin2)`: `(-a) * b == a * (-b)` exactly in IEEE arithmetic, so the
    result is bit-identical with two fewer ops per call."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) ⊙ up`: LLaDA's ff_proj/up_proj pair, Qwen2's gate_proj/up_proj pair."""
    return F.silu(gate) * up


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, T, H·D)` → `(B, H, T, D)`."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`(B, H, T, D)` → `(B, T, H·D)`."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def attend(
    attention: AttentionContext | None, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Dispatch one layer's attention: the caller's context, or full bidirectional attention.

    With no context, CUDA tensors in fp16/bf16 use flash-attn when it is installed (non-causal,
    GQA-native); everything else uses `sdpa`. The flash-attn branch is not exercised by the CPU
    test suite: it is verified on a GPU machine only.
    """
    if attention is not None:
        return attention.attend(layer, q, k, v)
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.transpose(1, 2)
    return sdpa(q, k, v)


class AttentionLayer(nn.Module):
    """Base of an LLaDA block / Dream layer: its index, head counts and the shared rotary.

    The q/k/v projections stay on the subclass under the released names; `self_attention` is the
    part both families compute the same way (project, split heads, RoPE, attend, merge heads).
    """

    def __init__(self, index: int, n_heads: int, n_kv_heads: int, rotary: Rotary) -> None:
        super().__init__()
        self.index = index
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.rotary = rotary

    def self_attention(
        self,
        x: torch.Tensor,
        projections: tuple[nn.Linear, nn.Linear, nn.Linear],
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionContext | None,
    ) -> torch.Tensor:
        """Attention output `(B, T, Hq·D)` for normed `x`, before the output projection."""
        q_proj, k_proj, v_proj = projections
        b, t, _ = x.shape
        qk = torch.cat([q_proj(x), k_proj(x)], dim=-1).view(b, t, self.n_heads + self.n_kv_heads, -1)
        q, k = self.rotary(qk, cos_sin).split([self.n_heads, self.n_kv_heads], dim=2)
        v = split_heads(v_proj(x), self.n_kv_heads)
        return merge_heads(attend(attention, self.index, q.transpose(1, 2), k.transpose(1, 2), v))


class NativeModel(DiffusionModel):
    """LLaDA and Dream around their layers: embed, RoPE tables once per forward, layers, final norm, head.

    Subclasses build the released parameter tree and say where its pieces are (`stack`).
    """

    def __init__(
        self,
        special_ids: SpecialIds,
        *,
        vocab_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_position: int,
        rotary: Rotary,
    ) -> None:
        super().__init__()
        self.special_ids = special_ids
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_position = max_position
        self.rotary = rotary

    def stack(self) -> tuple[nn.Embedding, nn.ModuleList, RMSNorm, torch.Tensor]:
        """The token embedding, the layers, the final norm and the output head's weight."""
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embed, layers, norm, head = self.stack()
        x = embed(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in layers:
            x = layer(x, cos_sin, attention)
        if logits_index is not None:  # the final norm is per position: select first, then norm + head
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_index)
        return F.linear(norm(x), head)


_flash_attn_func = load_flash_attn("flash_attn_func")
