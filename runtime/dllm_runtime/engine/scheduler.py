"""Admission control: which waiting requests join the running batch at the next step.

Pure bookkeeping (no threads, no torch): the engine calls it under its lock. Policy:

* strict FIFO: the head of the queue is admitted first and nothing overtakes it, so a large
  request waiting for room is never starved by a stream of small ones;
* a request is admitted against its *worst case* (a full-canvas forward, its whole KV cache), so
  once running it never has to be preempted: every later step fits whatever blocks the running
  sequences are at;
* requests that could never fit, even into an empty engine, are refused up front
  (`check_fits`) instead of waiting forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from dllm_runtime.engine.config import EngineConfig
from dllm_runtime.engine.request import QueueFullError, RequestValidationError

T = TypeVar("T")


@dataclass(frozen=True)
class Footprint:
    """Worst-case resources of one running sequence."""

    rows: int  # rows per forward (2 with classifier-free guidance)
    canvas: int  # prompt + generation slots
    cache_bytes: int  # block KV cache, 0 without a cache

    @property
    def tokens(self) -> int:
        """Tokens of a full-canvas forward: the most one step can ask for."""
        return self.rows * self.canvas


def estimate_cache_bytes(
    *, rows: int, canvas: int, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int
) -> int:
    """Bytes of the block KV cache `engine/step.py` allocates: K and V per layer, `(R, Hkv, L, D)`."""
    return 2 * num_layers * rows * num_kv_heads * canvas * head_dim * element_size


class Scheduler(Generic[T]):
    """FIFO waiting queue plus running-set accounting against `EngineConfig` limits."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._waiting: deque[tuple[T, Footprint]] = deque()
        self.num_running = 0
        self.running_tokens = 0
        self.reserved_cache_bytes = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting(self) -> Iterator[T]:
        return (item for item, _ in self._waiting)

    # ------------------------------------------------------------------ admission
    def check_fits(self, fp: Footprint, *, cfg_param: str = "cfg_scale") -> None:
        """Refuse a request that could not run even in an otherwise empty engine."""
        cfg = self.config
        if fp.tokens > cfg.max_num_batched_tokens:
            param = cfg_param if fp.rows > 1 and fp.canvas <= cfg.max_num_batched_tokens else "max_tokens"
            raise RequestValidationError(
                f"{param}: one forward of this request needs {fp.tokens} tokens ({fp.rows} row(s) x "
                f"{fp.canvas}-token canvas), more than the engine's max_num_batched_tokens={cfg.max_num_batched_tokens}",
                param,
            )
        if fp.cache_bytes > cfg.max_cache_bytes:
            raise RequestValidationError(
                f"cache: this request's KV cache needs about {fp.cache_bytes} bytes, more than the engine's "
                f"max_cache_bytes={cfg.max_cache_bytes}; use cache='none' or fewer max_tokens",
                "cache",
            )

    def enqueue(self, item: T, fp: Footprint) -> None:
        """Append to the waiting queue; `QueueFullError` when it already holds `max_waiting`."""
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the engine's waiting queue is full ({self.config.max_waiting} requests); retry later"
            )
        self._waiting.append((item, fp))

    def _fits_now(self, fp: Footprint) -> bool:
        cfg = self.config
        return (
            self.num_running + 1 <= cfg.max_num_seqs
            and self.running_tokens + fp.tokens <= cfg.max_num_batched_tokens
            and self.reserved_cache_bytes + fp.cache_bytes <= cfg.max_cache_bytes
        )

    def admit(self) -> list[T]:
        """Move waiting requests to running, in order, while the head fits (strict FIFO)."""
        admitted = []
        while self._waiting and self._fits_now(self._waiting[0][1]):
            item, fp = self._waiting.popleft()
            self.num_running += 1
            self.running_tokens += fp.tokens
            self.reserved_cache_bytes += fp.cache_bytes
            admitted.append(item)
        return admitted

    def release(self, fp: Footprint) -> None:
        """A running sequence left the batch: give its reservation back."""
        self.num_running -= 1
        self.running_tokens -= fp.tokens
        self.reserved_cache_bytes -= fp.cache_bytes

    def remove_waiting(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop (and return) waiting items for which `predicate(item)` is true (cancel, shutdown)."""
        kept: deque[tuple[T, Footprint]] = deque()
        removed = []
        for item, fp in self._waiting:
            if predicate(item):
                removed.append(item)
            else:
                kept.append((item, fp))
        self._waiting = kept
        return removed
