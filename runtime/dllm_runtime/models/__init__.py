"""Native torch diffusion LMs (LLaDA, Dream) loaded from Hugging Face folders, no remote code."""

from dllm_runtime.models.base import AttentionContext, DiffusionModel, SpecialIds
from dllm_runtime.models.dream import DreamModel
from dllm_runtime.models.llada import LLaDAModel
from dllm_runtime.models.loader import ModelLoadError, load_model, load_model_files, parse_dtype

__all__ = [
    "AttentionContext",
    "DiffusionModel",
    "DreamModel",
    "LLaDAModel",
    "ModelLoadError",
    "SpecialIds",
    "load_model",
    "load_model_files",
    "parse_dtype",
]
