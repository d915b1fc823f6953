"""Engine limits. Every limit is a setting; defaults suit one GPU replica of an 8B model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 1 << 30


@dataclass
class EngineConfig:
    """Admission limits of `AsyncEngine`.

    * `max_num_seqs`: sequences sharing one batched forward (vLLM `--max-num-seqs`).
    * `max_num_batched_tokens`: token budget of one forward. A sequence is admitted against its
      worst case, a full-canvas forward (`rows * (prompt + max_tokens)`; CFG has 2 rows), so a step
      never exceeds it whatever block each sequence is at.
    * `max_model_len`: prompt + generation canvas of one request (vLLM `--max-model-len`).
    * `max_waiting`: bounded FIFO of admitted-but-not-running requests; overflow is
      `QueueFullError` (retryable) instead of unbounded latency.
    * `max_cache_bytes`: block KV caches (prefix/dual) of all running sequences together; a
      request's footprint is estimated from the model shape before it is admitted.
    * `min_forward_tokens`: small forwards are padded to this many tokens so that CPU GEMMs use
      the same kernel whatever the batch size (per-request determinism; see
      `engine.step.batched_forward`). None = automatic: `max(64, 8 * torch threads)` on CPU, 0 on
      accelerators (whose kernels are not batch-invariant anyway; documented limitation).
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 16384
    max_model_len: int = 4096
    max_waiting: int = 1024
    max_cache_bytes: int = 8 * GiB
    min_forward_tokens: int | None = None

    def resolved_min_forward_tokens(self, device: torch.device) -> int:
        if self.min_forward_tokens is not None:
            return self.min_forward_tokens
        return max(64, 8 * torch.get_num_threads()) if device.type == "cpu" else 0

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_cache_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_forward_tokens is not None and self.min_forward_tokens < 0:
            raise ValueError(f"min_forward_tokens must be >= 0, got {self.min_forward_tokens}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}): a full-canvas forward of the longest request must fit in one step"
            )
