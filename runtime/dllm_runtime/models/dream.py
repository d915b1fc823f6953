"""Dream (`model_type: Dream`): Dream-v0 Base/Instruct 7B, Dream-Coder, d3LLM-Dream.

A Qwen2 decoder stack (GQA, q/k/v bias, untied head unless `tie_word_embeddings`) run with
bidirectional attention. Logits are returned raw; decoders shift them right by one
(`shift_logits = True`). ALGORITHMS.md §2.2 is the specification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_runtime.models.base import AttentionContext, SpecialIds
from dllm_runtime.models.layers import AttentionLayer, NativeModel, RMSNorm, Rotary, swiglu, token_embedding


@dataclass(frozen=True)
class DreamConfig:
    """The subset of the released `config.json` the forward depends on."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    head_dim: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DreamConfig:
        _require_supported(cfg)
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
        )


def _require_supported(cfg: dict[str, Any]) -> None:
    """Reject options that would silently change the logits (scaled RoPE, sliding windows)."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported Dream config hidden_act={act!r} (supported: ['silu'])")
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in ("default", None):
        raise ValueError(f"unsupported Dream config rope_scaling={cfg['rope_scaling']!r} (only unscaled RoPE)")
    if cfg.get("use_sliding_window"):
        raise ValueError("unsupported Dream config use_sliding_window=true")


def dream_position_ids(valid: torch.Tensor) -> torch.Tensor:
    """Dream RoPE positions: left pads skipped (`cumsum(valid) - 1`), pads themselves at 1."""
    pos = valid.long().cumsum(-1) - 1
    return pos.masked_fill(~valid.bool(), 1)


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DreamLayer(AttentionLayer):
    """Qwen2 decoder layer, bidirectional."""

    def __init__(self, cfg: DreamConfig, index: int, rotary: Rotary) -> None:
        super().__init__(index, cfg.num_attention_heads, cfg.num_key_value_heads, rotary)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.mlp = DreamMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionContext | None,
    ) -> torch.Tensor:
        a = self.self_attn
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        h = x + a.o_proj(self.self_attention(self.input_layernorm(x), qkv, cos_sin, attention))
        return h + self.mlp(self.post_attention_layernorm(h))


class _Backbone(nn.Module):
    """Holds the released `model.*` parameter tree."""

    def __init__(self, cfg: DreamConfig, rotary: Rotary) -> None:
        super().__init__()
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(NativeModel):
    """Dream mask predictor; raw logits (decoders shift right by one); positions skip left pads."""

    model_type = "Dream"
    shift_logits = True

    def __init__(self, cfg: DreamConfig, special_ids: SpecialIds) -> None:
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_key_value_heads}"
            )
        super().__init__(
            special_ids,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            max_position=cfg.max_position_embeddings,
            rotary=Rotary(cfg.head_dim, cfg.rope_theta, full_precision=False),
        )
        self.config = cfg
        self.model = _Backbone(cfg, self.rotary)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        return dream_position_ids(valid)

    def stack(self) -> tuple[nn.Embedding, nn.ModuleList, RMSNorm, torch.Tensor]:
        m = self.model
        head = m.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return m.embed_tokens, m.layers, m.norm, head
