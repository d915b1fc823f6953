"""Engine statistics: the `stats()` snapshot and the observer callbacks the metrics layer uses.

`EngineObserver` callbacks are called **from the engine's worker thread**, synchronously, between
steps: keep them cheap and thread-safe (prometheus_client metrics are). An exception raised by an
observer is logged and ignored; it never stops the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """One engine step (one batched forward)."""

    batch_size: int  # sequences in the forward
    tokens_in_forward: int  # real (unpadded) tokens over all rows of the forward
    tokens_committed: int  # masked slots filled by this step, all sequences
    latency_s: float  # plan + forward + commit + detokenize
    cache_bytes: int  # KV cache bytes held after the step
    num_running: int
    num_waiting: int


@dataclass(frozen=True)
class RequestStats:
    """One finished request (any finish reason)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    nfe: int  # model forwards this request took part in
    steps: int  # engine steps it was scheduled in
    finish_reason: str
    queue_time_s: float  # submission -> first step
    ttft_s: float | None  # submission -> first finalised token (None if none was produced)
    e2e_s: float  # submission -> finish


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's state and lifetime counters."""

    num_running: int
    num_waiting: int
    max_num_seqs: int
    batch_occupancy: float  # num_running / max_num_seqs
    total_steps: int
    total_forwards: int
    total_tokens_committed: int
    total_requests_finished: int
    cache_bytes: int  # KV cache bytes actually held now
    reserved_cache_bytes: int  # estimated footprints reserved by admitted sequences
    max_cache_bytes: int
    last_step_latency_s: float


class EngineObserver(Protocol):
    """Receives engine events (from the worker thread); implement either method as a no-op."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, stats: RequestStats) -> None: ...


def notify(observer: EngineObserver | None, method: str, stats: StepStats | RequestStats) -> None:
    """Call `observer.<method>(stats)`; an observer's exception is logged and ignored, never the engine's."""
    if observer is None:
        return
    try:
        getattr(observer, method)(stats)
    except Exception:
        logger.exception("engine observer %s failed (ignored)", method)
