"""Request/response types of the engine API and the errors `AsyncEngine.generate` raises.

These are the types the OpenAI server codes against: one `GenerationRequest` in, an async stream of
`GenerationOutput` deltas out. Errors raised *before* the first output (validation, queue full) are
exceptions so the server can answer 400/429/503 without opening a stream; anything that goes wrong
after that arrives as a final output with `finish_reason="error"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # params.py is owned by the decoding engineers; only its type is needed here
    from dllm_runtime.decoding.params import DecodingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class GenerationRequest:
    """One generation: prompt token ids, decoding settings and optional stop strings.

    `stream=False` (an API request without `stream`): the request yields one output, the final,
    carrying everything a stream would have sent (vLLM's FINAL_ONLY output kind): no per-step deltas
    cross to the event loop for a client that reads only the end (`bench/engine.py --no-stream`).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: DecodingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = True


@dataclass
class GenerationOutput:
    """One streamed delta of a request (with `stream=False`, the one output: all of it).

    `text_delta`/`token_ids_delta` cover only newly *finalised* text: the committed left-to-right
    prefix of the canvas, minus anything a stop string may still cut and minus an incomplete
    multi-byte character. Concatenating every delta of a request gives its final text. The last
    output has `finished=True`, a `finish_reason` and the usage counts.
    """

    request_id: str
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    nfe: int = 0
    error: str | None = None


class EngineError(RuntimeError):
    """Base class of the engine's own runtime errors."""


class QueueFullError(EngineError):
    """The bounded waiting queue is full: retry later (HTTP 429 / 503 with Retry-After)."""

    retryable = True


class EngineShutdownError(QueueFullError):
    """The engine is shutting down or stopped and admits nothing new (HTTP 503; retry elsewhere)."""


class RequestValidationError(ValueError):
    """The request can never be served as asked (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
