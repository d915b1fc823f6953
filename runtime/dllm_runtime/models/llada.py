"""LLaDA (`model_type: llada`): LLaDA-8B Base/Instruct, LLaDA-1.5 and d3LLM-LLaDA.

A Llama-style block stack (`block_type: llama`) with bidirectional attention, written against the
released tensor names (`model.transformer.*`) so Hub checkpoints load without remote code.
ALGORITHMS.md §2.1 is the specification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dllm_runtime.models.base import AttentionContext, SpecialIds
from dllm_runtime.models.layers import AttentionLayer, NativeModel, RMSNorm, Rotary, swiglu, token_embedding


@dataclass(frozen=True)
class LLaDAConfig:
    """The subset of the released `config.json` the forward depends on."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    embedding_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    rope_full_precision: bool
    include_qkv_bias: bool
    weight_tying: bool
    max_sequence_length: int

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LLaDAConfig:
        _require_supported(cfg)
        d_model = int(cfg["d_model"])
        n_heads = int(cfg["n_heads"])
        mlp = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d_model
        vocab = int(cfg["vocab_size"])
        return cls(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=1 if cfg.get("multi_query_attention") else int(cfg.get("n_kv_heads") or n_heads),
            n_layers=int(cfg["n_layers"]),
            mlp_hidden_size=int(mlp),
            embedding_size=int(cfg.get("embedding_size") or vocab),
            vocab_size=vocab,
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_full_precision=bool(cfg.get("rope_full_precision", True)),
            include_qkv_bias=bool(cfg.get("include_qkv_bias")),
            weight_tying=bool(cfg.get("weight_tying", False)),
            max_sequence_length=int(cfg.get("max_sequence_length", 4096)),
        )


def _require_supported(cfg: dict[str, Any]) -> None:
    """Reject config options the released checkpoints never use instead of computing wrong logits."""
    checks = {
        "block_type": ("llama",),
        "layer_norm_type": ("rms",),
        "activation_type": ("silu", "swiglu"),
        "rope": (True,),
        "alibi": (False,),
        "scale_logits": (False,),
        "input_emb_norm": (False,),
        "attention_layer_norm": (False,),
    }
    for key, allowed in checks.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"unsupported LLaDA config {key}={cfg[key]!r} (supported: {list(allowed)})")
    if cfg.get("include_bias"):
        raise ValueError("unsupported LLaDA config include_bias=true (released checkpoints have no biases)")


def llada_position_ids(valid: torch.Tensor) -> torch.Tensor:
    """LLaDA RoPE positions: 0..L-1 even under left padding (pads keep their positions)."""
    b, length = valid.shape
    return torch.arange(length, device=valid.device).expand(b, length)


class LLaDABlock(AttentionLayer):
    """`LLaDALlamaBlock`: pre-norm attention and SwiGLU MLP with residuals."""

    def __init__(self, cfg: LLaDAConfig, index: int, rotary: Rotary) -> None:
        super().__init__(index, cfg.n_heads, cfg.n_kv_heads, rotary)
        kv_dim = cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        bias = cfg.include_qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionContext | None,
    ) -> torch.Tensor:
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        h = x + self.attn_out(self.self_attention(self.attn_norm(x), qkv, cos_sin, attention))
        m = self.ff_norm(h)
        return h + self.ff_out(swiglu(self.ff_proj(m), self.up_proj(m)))


class _Transformer(nn.Module):
    """Holds the released `model.transformer.*` parameter tree."""

    def __init__(self, cfg: LLaDAConfig, rotary: Rotary) -> None:
        super().__init__()
        self.wte = token_embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg, i, rotary) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class _Inner(nn.Module):
    def __init__(self, cfg: LLaDAConfig, rotary: Rotary) -> None:
        super().__init__()
        self.transformer = _Transformer(cfg, rotary)


class LLaDAModel(NativeModel):
    """LLaDA mask predictor; logits are not shifted; RoPE positions ignore left padding."""

    model_type = "llada"
    shift_logits = False

    def __init__(self, cfg: LLaDAConfig, special_ids: SpecialIds) -> None:
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"d_model {cfg.d_model}, n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads} do not divide")
        head_dim = cfg.d_model // cfg.n_heads
        super().__init__(
            special_ids,
            vocab_size=cfg.embedding_size,
            num_layers=cfg.n_layers,
            num_kv_heads=cfg.n_kv_heads,
            head_dim=head_dim,
            max_position=cfg.max_sequence_length,
            rotary=Rotary(head_dim, cfg.rope_theta, full_precision=cfg.rope_full_precision),
        )
        self.config = cfg
        self.model = _Inner(cfg, self.rotary)

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        return llada_position_ids(valid)

    def stack(self) -> tuple[nn.Embedding, nn.ModuleList, RMSNorm, torch.Tensor]:
        t = self.model.transformer
        head = t.wte.weight if self.config.weight_tying else t.ff_out.weight
        return t.wte, t.blocks, t.ln_f, head
