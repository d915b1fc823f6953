"""Continuous-batching diffusion engine: one step loop batching every running sequence.

Public API (what the server imports): `AsyncEngine`, `EngineConfig`, `GenerationRequest`,
`GenerationOutput`, the errors `QueueFullError` / `EngineShutdownError` / `RequestValidationError`,
and the statistics types `EngineStats`, `StepStats`, `RequestStats`, `EngineObserver`.
"""

from dllm_runtime.engine.config import EngineConfig
from dllm_runtime.engine.engine import AsyncEngine
from dllm_runtime.engine.request import (
    EngineError,
    EngineShutdownError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
)
from dllm_runtime.engine.stats import EngineObserver, EngineStats, RequestStats, StepStats

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineShutdownError",
    "EngineStats",
    "FinishReason",
    "GenerationOutput",
    "GenerationRequest",
    "QueueFullError",
    "RequestStats",
    "RequestValidationError",
    "StepStats",
]
