"""Where decoding policies come from: serving settings or a reference call.

Two tables, both plain dicts so each decoder module registers itself with one line:

* `ALGORITHMS`: `DecodingParams.algorithm` -> factory `(params, model) -> DecodingPolicy`, used by the
  engine for every request (`build_policy`).
* `REFERENCES`: upstream function name (the golden case's `reference` without its trailing
  `(version)`) -> factory `(kwargs, special_ids) -> ReferenceDecoder`, used by the conformance runner
  to replay a recorded call with its exact keyword arguments (`policy_from_reference`).

Decoder modules are imported lazily by name (`_MODULES`) so that a missing or broken optional
decoder fails only the requests or cases that need it, with a clear message.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dllm_runtime.decoding.base import DecodingPolicy
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.models.base import DiffusionModel, SpecialIds


@dataclass(frozen=True)
class ReferenceDecoder:
    """A policy plus the canvas layout the recorded reference call used."""

    policy: DecodingPolicy
    #: masked slots appended to every prompt row (the reference's gen_length / max_new_tokens)
    gen_length: int
    #: special ids of the call (the reference's `mask_id` argument overrides the file's mask id)
    special: SpecialIds


PolicyFactory = Callable[[DecodingParams, DiffusionModel], DecodingPolicy]
ReferenceFactory = Callable[[dict[str, Any], SpecialIds], ReferenceDecoder]

ALGORITHMS: dict[str, PolicyFactory] = {}
REFERENCES: dict[str, ReferenceFactory] = {}

#: modules that register decoders on import (each calls `register_algorithm` / `register_reference`)
_MODULES: tuple[str, ...] = (
    "dllm_runtime.decoding.llada",
    "dllm_runtime.decoding.fast_dllm",
    "dllm_runtime.decoding.dream",
    "dllm_runtime.decoding.d3llm",
)
_import_errors: dict[str, str] = {}
_loaded = False


def register_algorithm(name: str, factory: PolicyFactory) -> None:
    ALGORITHMS[name] = factory


def register_reference(name: str, factory: ReferenceFactory) -> None:
    REFERENCES[reference_key(name)] = factory


def reference_key(reference: str) -> str:
    """`'NVlabs/Fast-dLLM v1/llada/generate.py::generate (a9b81e4)'` -> without the `(...)` suffixes."""
    return re.sub(r"(\s*\([^()]*\))+\s*$", "", reference.strip())


def _load_decoders() -> None:
    """Import every decoder module once; a module that fails to import fails every call, loudly."""
    global _loaded
    if _loaded:
        return
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside an existing decoder module
                raise
            _import_errors[module] = "not installed"
    _loaded = True


def build_policy(params: DecodingParams, model: DiffusionModel) -> DecodingPolicy:
    """The policy serving `params` on `model` (params are validated here too)."""
    params.validate()
    _load_decoders()
    factory = ALGORITHMS.get(params.algorithm)
    if factory is None:
        raise ValueError(f"algorithm: {params.algorithm!r} is not available (have: {', '.join(sorted(ALGORITHMS))})")
    return factory(params, model)


def policy_from_reference(reference: str, kwargs: dict[str, Any], special_ids: SpecialIds) -> ReferenceDecoder:
    """The policy replaying one recorded reference call (golden case `reference` + `kwargs`)."""
    _load_decoders()
    key = reference_key(reference)
    factory = REFERENCES.get(key)
    if factory is None:
        raise KeyError(f"no decoder reproduces reference {key!r} (known: {sorted(REFERENCES)})")
    return factory(dict(kwargs), special_ids)
