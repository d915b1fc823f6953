"""Load native models from Hugging Face folders (config.json + safetensors, sharded or not).

Modules are built on the meta device and filled tensor by tensor from safetensors, so an 8B model
never exists twice in memory. Every failure is a `ModelLoadError` that names the file and, where
there is one, the tensor: an operator reading a pod log must be able to act on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dllm_runtime.models.base import DiffusionModel, SpecialIds
from dllm_runtime.models.dream import DreamConfig, DreamModel
from dllm_runtime.models.llada import LLaDAConfig, LLaDAModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: `model_type` (lower-cased) → (config parser, model class).
ARCHITECTURES: dict[str, tuple[Any, type[DiffusionModel]]] = {
    "llada": (LLaDAConfig, LLaDAModel),
    "dream": (DreamConfig, DreamModel),
}

#: `architectures[0]` → model_type, for exports that dropped `model_type`.
_ARCH_CLASSES = {"LLaDAModelLM": "llada", "DreamModel": "Dream"}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip

#: Checkpoint tensors that carry no weights (precomputed RoPE tables of older exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelLoadError(Exception):
    """A model folder that cannot be loaded; the message names the file (and tensor)."""


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """`None`/`"auto"` → None (use the checkpoint's); otherwise a float dtype or `ValueError`."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r} (choose auto, float32, bfloat16 or float16)")
    return _DTYPES[key]


def read_config(config_path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(config_path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: config file not found")
    try:
        with path.open(encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: config must be a JSON object")
    return cfg


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a folder: the index's shards, else `model.safetensors`."""
    folder = Path(model_dir)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: invalid safetensors index: {exc}") from exc
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return shards
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise ModelLoadError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors (PyTorch .bin is not supported)")


def load_model(
    path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionModel:
    """Load a Hugging Face model folder (`config.json` + safetensors) as a native `DiffusionModel`."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found")
    return load_model_files(folder / "config.json", weight_files(folder), dtype=dtype, device=device, model_dir=folder)


def load_model_files(
    config_path: str | os.PathLike[str],
    weight_paths: Iterable[str | os.PathLike[str]],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    special_ids: SpecialIds | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> DiffusionModel:
    """Load from explicit files (the golden layout: `llada_tiny_config.json` + `llada_tiny.safetensors`).

    `dtype`: None/"auto" takes `torch_dtype` from the config, else the stored tensors' dtype.
    Special ids come from `special_ids`, else from the config and the tokenizer files in `model_dir`
    (default: the config's folder).
    """
    from dllm_runtime.tokenizer import resolve_special_ids

    config_path = Path(config_path)
    paths = [Path(p) for p in weight_paths]
    if not paths:
        raise ModelLoadError(f"{config_path}: no weight files given")
    cfg = read_config(config_path)
    target_device = _parse_device(device)
    requested = parse_dtype(dtype)

    model_type = str(cfg.get("model_type") or _ARCH_CLASSES.get(next(iter(cfg.get("architectures") or []), ""), ""))
    if model_type.lower() not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"{config_path}: unknown model_type {model_type!r} (supported: {supported})")
    config_cls, model_cls = ARCHITECTURES[model_type.lower()]
    try:
        arch_cfg = config_cls.from_dict(cfg)
        ids = special_ids or resolve_special_ids(cfg, model_dir=model_dir or config_path.parent)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: invalid config: {exc}") from exc

    try:
        with torch.device("meta"):
            model = model_cls(arch_cfg, ids)
    except ValueError as exc:
        raise ModelLoadError(f"{config_path}: invalid config: {exc}") from exc
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored_dtype = _check_headers(paths, expected)
    final_dtype = requested or _config_dtype(cfg, config_path) or stored_dtype
    state = _read_tensors(paths, target_device, final_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    _check_special_ids(model, config_path)
    return model


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _open(path: Path):
    """`safe_open` with errors that name the file (a truncated file fails here, on its header)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"{path}: weight file not found")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: header/length checks fail on truncation
        raise ModelLoadError(f"{path}: cannot read safetensors file (truncated or corrupt?): {exc}") from exc


def _entries(paths: list[Path]) -> Iterator[tuple[Path, Any, str]]:
    """`(file, open handle, tensor name)` for every tensor of the model, file by file (both passes
    over a checkpoint skip the same non-parameter entries)."""
    for path in paths:
        with _open(path) as f:
            for name in f.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    yield path, f, name


def _check_headers(paths: list[Path], expected: Mapping[str, tuple[int, ...]]) -> torch.dtype:
    """Validate names and shapes from the headers only (no tensor data is read); returns the stored dtype.

    Checking everything before reading anything means a bad checkpoint fails in milliseconds, and the
    tensors can then be converted one by one (peak memory: the model plus one tensor).
    """
    seen: dict[str, Path] = {}
    stored = torch.float32
    for path, f, name in _entries(paths):
        if name not in expected:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r} (not part of this architecture)")
        if name in seen:
            raise ModelLoadError(f"{path}: tensor {name!r} also appears in {seen[name]}")
        info = f.get_slice(name)
        shape = tuple(info.get_shape())
        if shape != expected[name]:
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(shape)}, config expects {list(expected[name])}")
        stored = _SAFETENSORS_FLOATS.get(info.get_dtype(), stored)
        seen[name] = path
    missing = [name for name in expected if name not in seen]
    if missing:
        files = ", ".join(str(p) for p in paths)
        raise ModelLoadError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more) in {files}")
    return stored


def _read_tensors(paths: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path, f, name in _entries(paths):
        try:
            tensor = f.get_tensor(name)
        except Exception as exc:  # data region unreadable although the header parsed
            raise ModelLoadError(f"{path}: cannot read tensor {name!r}: {exc}") from exc
        state[name] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
    return state


def _config_dtype(cfg: Mapping[str, Any], config_path: Path) -> torch.dtype | None:
    value = cfg.get("torch_dtype") or cfg.get("dtype")  # transformers 5 writes "dtype"
    if value is None:
        return None
    try:
        return parse_dtype(value)
    except ValueError as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from exc


def _parse_device(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def _check_special_ids(model: DiffusionModel, config_path: Path) -> None:
    ids = model.special_ids
    for field in ("mask", "eos", "pad", "eot", "bos"):
        value = getattr(ids, field)
        if value is not None and not 0 <= value < model.vocab_size:
            raise ModelLoadError(f"{config_path}: {field} token id {value} is outside the vocabulary (size {model.vocab_size})")
