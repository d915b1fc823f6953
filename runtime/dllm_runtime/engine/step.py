"""The one step loop: the planned forwards of many sequences as one batched model call.

Used by the serving engine (continuous batching), `dllm-serve generate` and the conformance runner.
Rows of different lengths are right-padded with invalid keys (pad-and-mask); rows that read a block
KV cache attend to `cache[:offset] ++ new ++ cache[offset+T:]`, exactly the key order of the
Fast-dLLM prefix/dual caches, so a batch of one reproduces the references bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dllm_runtime.decoding.base import DecodingPolicy, ForwardSpec, KVCache, Sequence
from dllm_runtime.models.attention import KeyMaskAttention, sdpa
from dllm_runtime.models.base import DiffusionModel


@dataclass
class _Row:
    seq: Sequence
    spec: ForwardSpec
    row: int  # row index inside spec (CFG has 2)
    length: int  # T of this row (unpadded)


class BatchedCacheAttention:
    """Per-row key sets for a batch where some rows read or write a sequence's KV cache."""

    def __init__(self, rows: list[_Row], new_valid: torch.Tensor) -> None:
        self.rows = rows
        self.new_valid = new_valid  # (N, Tmax)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values, valids = [], [], []
        for i, r in enumerate(self.rows):
            kv = r.seq.kv
            if r.spec.store_cache:
                self._store(layer, r, k[i, :, : r.length], v[i, :, : r.length], self.new_valid[i, : r.length])
            if r.spec.use_cache:
                if kv is None:
                    raise RuntimeError("policy asked for a KV cache before building one (use store_cache first)")
                lo, hi = r.spec.offset, r.spec.offset + r.length
                keys.append(torch.cat([kv.keys[layer][r.row, :, :lo], k[i], kv.keys[layer][r.row, :, hi:]], dim=1))
                values.append(torch.cat([kv.values[layer][r.row, :, :lo], v[i], kv.values[layer][r.row, :, hi:]], dim=1))
                valids.append(torch.cat([kv.valid[r.row, :lo], self.new_valid[i], kv.valid[r.row, hi:]]))
            else:
                keys.append(k[i])
                values.append(v[i])
                valids.append(self.new_valid[i])
        kmax = max(t.shape[1] for t in keys)
        if all(t.shape[1] == kmax for t in keys) and len(keys) == 1:
            key_valid = None if bool(valids[0].all()) else valids[0][None]
            return sdpa(q, keys[0][None], values[0][None], key_valid)
        key_t = torch.stack([_pad_dim1(t, kmax) for t in keys])
        val_t = torch.stack([_pad_dim1(t, kmax) for t in values])
        valid_t = torch.stack([torch.nn.functional.pad(t, (0, kmax - t.shape[0]), value=False) for t in valids])
        return sdpa(q, key_t, val_t, valid_t)

    @staticmethod
    def _store(layer: int, r: _Row, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        seq = r.seq
        if seq.kv is None:
            rows = r.spec.input_ids.shape[0]
            shape = (rows, k.shape[0], seq.length, k.shape[-1])
            n_layers = seq.state["_num_layers"]
            seq.kv = KVCache(
                keys=[k.new_zeros(shape) for _ in range(n_layers)],
                values=[v.new_zeros(shape) for _ in range(n_layers)],
                valid=torch.zeros(rows, seq.length, dtype=torch.bool, device=k.device),
            )
        lo, hi = r.spec.offset, r.spec.offset + r.length
        seq.kv.keys[layer][r.row, :, lo:hi] = k
        seq.kv.values[layer][r.row, :, lo:hi] = v
        seq.kv.valid[r.row, lo:hi] = valid


def _pad_dim1(t: torch.Tensor, size: int) -> torch.Tensor:
    """Right-pad `(H, K, D)` along K with zeros (their keys are masked)."""
    return torch.nn.functional.pad(t, (0, 0, 0, size - t.shape[1]))


def batched_forward(model: DiffusionModel, work: list[tuple[Sequence, ForwardSpec]]) -> list[torch.Tensor]:
    """Run every spec in one model call; returns each spec's logits `(R, T, V)`."""
    rows: list[_Row] = []
    for seq, spec in work:
        for r in range(spec.input_ids.shape[0]):
            rows.append(_Row(seq, spec, r, spec.input_ids.shape[1]))
    tmax = max(r.length for r in rows)
    device = work[0][1].input_ids.device
    pad_id = model.special_ids.pad
    ids = torch.full((len(rows), tmax), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((len(rows), tmax), dtype=torch.long, device=device)
    valid = torch.zeros((len(rows), tmax), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, : r.length] = r.spec.input_ids[r.row]
        pos[i, : r.length] = r.spec.positions[r.row]
        valid[i, : r.length] = True if r.spec.valid is None else r.spec.valid[r.row]

    uses_cache = any(s.use_cache or s.store_cache for _, s in work)
    if uses_cache:
        for seq, spec in work:
            if spec.store_cache:
                seq.state["_num_layers"] = model.num_layers
                seq.kv = None  # a storing forward rebuilds the cache from scratch
        attention = BatchedCacheAttention(rows, valid)
    else:
        attention = KeyMaskAttention(None if bool(valid.all()) else valid)
    logits = model(ids, pos, attention)

    out, i = [], 0
    for seq, spec in work:
        n, t = spec.input_ids.shape
        out.append(logits[i : i + n, :t])
        i += n
    return out


@dataclass
class StepResult:
    """What one `run_step` did (the engine's step statistics)."""

    sequences: int = 0  # sequences that took part in the forward
    rows: int = 0  # model rows (CFG sequences have 2)
    tokens: int = 0  # real (unpadded) tokens over all rows


#: called with the failing sequence and its exception; the sequence is already marked finished
ErrorHandler = Callable[[Sequence, Exception], None]


def run_step(
    model: DiffusionModel,
    batch: list[tuple[Sequence, DecodingPolicy]],
    on_error: ErrorHandler | None = None,
) -> StepResult:
    """One engine step: plan every sequence, one batched forward, commit every sequence.

    Sequences whose policy has nothing left to do are marked finished without a forward.
    Without `on_error` any exception propagates (conformance, `generate`). With it (the serving
    engine) a failing `plan`/`commit` finishes only its own sequence, and a failing batched forward
    is retried one sequence at a time so that only the sequence that breaks it fails.
    """
    work: list[tuple[Sequence, ForwardSpec, DecodingPolicy]] = []
    for seq, policy in batch:
        if seq.finished:
            continue
        try:
            spec = policy.plan(seq)
        except Exception as exc:
            if on_error is None:
                raise
            _fail(seq, exc, on_error)
            continue
        if spec is None:
            seq.finished = True
        else:
            work.append((seq, spec, policy))
    if not work:
        return StepResult()
    try:
        with torch.inference_mode():
            logits = batched_forward(model, [(s, f) for s, f, _ in work])
    except Exception as exc:
        if on_error is None:
            raise
        if len(work) == 1:
            _fail(work[0][0], exc, on_error)
            return StepResult()
        work, logits = _isolate_forward(model, work, on_error)
    result = StepResult()
    for (seq, spec, policy), seq_logits in zip(work, logits):
        seq.nfe += 1
        result.sequences += 1
        result.rows += spec.input_ids.shape[0]
        result.tokens += int(spec.input_ids.numel() if spec.valid is None else spec.valid.sum())
        try:
            policy.commit(seq, seq_logits)
        except Exception as exc:
            if on_error is None:
                raise
            _fail(seq, exc, on_error)
    return result


def _fail(seq: Sequence, exc: Exception, on_error: ErrorHandler) -> None:
    seq.finished = True
    on_error(seq, exc)


def _isolate_forward(
    model: DiffusionModel,
    work: list[tuple[Sequence, ForwardSpec, DecodingPolicy]],
    on_error: ErrorHandler,
) -> tuple[list[tuple[Sequence, ForwardSpec, DecodingPolicy]], list[torch.Tensor]]:
    """Re-run a failed batched forward one sequence at a time; only failing sequences are dropped."""
    kept, logits = [], []
    for item in work:
        try:
            with torch.inference_mode():
                logits.append(batched_forward(model, [(item[0], item[1])])[0])
            kept.append(item)
        except Exception as exc:
            _fail(item[0], exc, on_error)
    return kept, logits


def run_to_completion(model: DiffusionModel, batch: list[tuple[Sequence, DecodingPolicy]]) -> None:
    """Drive sequences until every policy is done (conformance, `generate`, tests)."""
    for seq, policy in batch:
        policy.init(seq)
    while not all(seq.finished for seq, _ in batch):
        run_step(model, batch)
