"""Random-weight tiny Hugging Face model folders for engine, server and loader tests.

`make_tiny_model_dir` writes what a real checkpoint folder holds: a `config.json` in the released
format (LLaDA or Dream), `model.safetensors` with the released tensor names, and the tokenizer files
of the shared stand-in tokenizers, so `load_model` / `load_tokenizer` treat it exactly like a Hub
download. Vocabularies are full size (special ids sit at their real, large ids), so widths stay tiny
to keep the files at a few tens of MB.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

#: Copies of ../shared/tokenizers (LLaDA stand-in with the real special ids and template, the real
#: LLaDA-8B-Instruct configs, Dream's Qwen2 tokenizer): the suite runs on a clone alone.
TOKENIZERS = Path(os.environ.get("DLLM_TOKENIZERS_DIR", Path(__file__).resolve().parents[1] / "assets" / "tokenizers"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")

#: Released config formats with tiny sizes; the special ids are the real ones of each family.
LLADA_CONFIG: dict[str, Any] = {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "activation_type": "silu",
    "alibi": False,
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "block_type": "llama",
    "d_model": 32,
    "n_heads": 2,
    "n_kv_heads": 2,
    "n_layers": 2,
    "mlp_hidden_size": 64,
    "mlp_ratio": 2,
    "vocab_size": 126464,
    "embedding_size": 126464,
    "embedding_dropout": 0.0,
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "max_sequence_length": 4096,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "weight_tying": False,
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "torch_dtype": "float32",
    "use_cache": False,
}
LLADA_GENERATION_CONFIG = {"bos_token_id": 126080, "eos_token_id": 126081}

DREAM_CONFIG: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "hidden_act": "silu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "mask_token_id": 151666,
    "pad_token_id": 151643,
    "bos_token_id": 151665,
    "eos_token_id": 151643,
    "torch_dtype": "float32",
    "use_cache": False,
}
DREAM_GENERATION_CONFIG = {"bos_token_id": 151665, "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": 151666}

_ARCH = {
    "llada": (LLADA_CONFIG, LLADA_GENERATION_CONFIG, "llada-standin"),
    "dream": (DREAM_CONFIG, DREAM_GENERATION_CONFIG, "dream-v0-instruct-7b"),
}


def tiny_state_dict(arch: str, config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights under the released tensor names for `config`."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + rand(dim, std=0.05)

    sd: dict[str, torch.Tensor] = {}
    if arch == "llada":
        d, heads, kv = config["d_model"], config["n_heads"], config["n_kv_heads"]
        kv_dim, mlp, emb = kv * (d // heads), config["mlp_hidden_size"], config["embedding_size"]
        p = "model.transformer."
        sd[p + "wte.weight"] = rand(emb, d, std=1.0)
        for i in range(config["n_layers"]):
            b = f"{p}blocks.{i}."
            sd[b + "attn_norm.weight"] = norm(d)
            sd[b + "ff_norm.weight"] = norm(d)
            sd[b + "q_proj.weight"] = rand(d, d, std=0.3)
            sd[b + "k_proj.weight"] = rand(kv_dim, d, std=0.3)
            sd[b + "v_proj.weight"] = rand(kv_dim, d, std=0.2)
            sd[b + "attn_out.weight"] = rand(d, d, std=0.2)
            sd[b + "ff_proj.weight"] = rand(mlp, d, std=0.2)
            sd[b + "up_proj.weight"] = rand(mlp, d, std=0.2)
            sd[b + "ff_out.weight"] = rand(d, mlp, std=0.2)
        sd[p + "ln_f.weight"] = norm(d)
        if not config.get("weight_tying"):
            sd[p + "ff_out.weight"] = rand(emb, d, std=0.5)
    elif arch == "dream":
        d, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
        hd = config.get("head_dim") or d // heads
        mlp, vocab = config["intermediate_size"], config["vocab_size"]
        sd["model.embed_tokens.weight"] = rand(vocab, d, std=1.0)
        for i in range(config["num_hidden_layers"]):
            b = f"model.layers.{i}."
            sd[b + "input_layernorm.weight"] = norm(d)
            sd[b + "post_attention_layernorm.weight"] = norm(d)
            for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                sd[f"{b}self_attn.{name}.weight"] = rand(rows, d, std=0.3)
                sd[f"{b}self_attn.{name}.bias"] = rand(rows, std=0.1)
            sd[b + "self_attn.o_proj.weight"] = rand(d, heads * hd, std=0.2)
            sd[b + "mlp.gate_proj.weight"] = rand(mlp, d, std=0.2)
            sd[b + "mlp.up_proj.weight"] = rand(mlp, d, std=0.2)
            sd[b + "mlp.down_proj.weight"] = rand(d, mlp, std=0.2)
        sd["model.norm.weight"] = norm(d)
        if not config.get("tie_word_embeddings"):
            sd["lm_head.weight"] = rand(vocab, d, std=0.5)
    else:
        raise ValueError(f"unknown arch {arch!r} (choose 'llada' or 'dream')")
    return sd


def write_weights(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> list[Path]:
    """Save `state` as `model.safetensors`, or as `shards` files with a `save_pretrained`-style index."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return [folder / "model.safetensors"]
    names = sorted(state)
    weight_map: dict[str, str] = {}
    files = []
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        files.append(folder / fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def make_tiny_model_dir(
    path: str | os.PathLike[str], arch: str = "llada", seed: int = 0, shards: int = 1, **overrides: Any
) -> Path:
    """Write a loadable tiny model folder at `path` (created if needed) and return it.

    `overrides` replace `config.json` keys (e.g. `n_layers=1`, `torch_dtype="bfloat16"`); the weights
    follow the overridden sizes. Weights are stored in fp32 whatever `torch_dtype` says, as many Hub
    exports do; the loader casts. `shards > 1` writes `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json`, the layout of large checkpoints.
    """
    if arch not in _ARCH:
        raise ValueError(f"unknown arch {arch!r} (choose 'llada' or 'dream')")
    base, generation, tokenizer = _ARCH[arch]
    config = {**base, **overrides}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    write_weights(folder, tiny_state_dict(arch, config, seed), shards)
    source = TOKENIZERS / tokenizer
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: tokenizer folder missing (tests/assets/tokenizers or DLLM_TOKENIZERS_DIR)")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    return folder
