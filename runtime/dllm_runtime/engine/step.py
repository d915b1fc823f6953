"""The one step loop: the planned forwards of many sequences as one batched model call.

Used by the serving engine (continuous batching), `dllm-serve generate` and the conformance runner.
Layout of the model call: rows of one length form a plain `(N, T)` batch; rows of different lengths
are *packed* end to end into one `(1, sum T)` row, so projections and MLPs spend nothing on padding
(vLLM-style varlen batching). Either way attention runs per group of equal-length rows on unpadded
keys (`ragged_sdpa`), so a row's logits are bit-identical alone or in any batch (per-request
determinism). On a GPU (fp16/bf16) it is instead one varlen FlashAttention call for every row
(`use_varlen`: flash-attn's kernel, else PyTorch's own): GPU kernels are not batch-invariant
anyway. Rows that read a block KV cache attend to `cache[:offset] ++ new ++ cache[offset+T:]`,
exactly the key order of the Fast-dLLM prefix/dual caches, so a batch of one reproduces the
references bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

from dllm_runtime.decoding.base import DecodingPolicy, ForwardSpec, KVCache, Sequence
from dllm_runtime.models.attention import KeyMaskAttention, sdpa, varlen_attention, varlen_available
from dllm_runtime.models.base import AttentionContext, DiffusionModel

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    seq: Sequence
    spec: ForwardSpec
    row: int  # row index inside spec (CFG has 2)
    length: int  # T of this row (unpadded)
    b: int = 0  # where the row sits in the model call: batch index ...
    start: int = 0  # ... and first token (packed rows share b = 0)

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """This row's slice of a `(B, T, ...)` tensor of the model call (ids, positions, logits)."""
        return t[self.b, self.start : self.start + self.length]

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """This row's slice of a `(B, H, T, D)` attention tensor."""
        return t[self.b, :, self.start : self.start + self.length]


#: one SDPA group: query length, row indices, key mask (None: no padded key), key positions (None: all)
_Group = tuple[int, list[int], "torch.Tensor | None", "torch.Tensor | None"]


class RowKeys:
    """How a forward's rows attend, worked out once per forward and reused by every layer.

    Each layer attends the same rows to key sets of the same lengths and padding; only the numbers
    differ. So the grouping of rows and their stacked key masks (with the host read that says whether
    a group needs one), or the varlen kernel's token index and cumulative lengths, are computed at the first
    layer instead of in each layer. `valids[i]` `(K_i,)` marks row i's non-pad keys, in key order;
    `valids=None`: every row attends to its own tokens, none of them padding (nothing to mask or read).
    """

    def __init__(self, rows: list[_Row], valids: list[torch.Tensor] | None) -> None:
        self.rows = rows
        self.valids = valids
        self._groups: list[_Group] | None = None
        self._plain: bool | None = None
        self._tokens: torch.Tensor | None = None
        self._all_tokens = False  # every position of the call is a row's token (rows tile it in order)
        self._varlen: _VarlenPlan | None = None

    # ------------------------------------------------------------------ per-group SDPA (CPU, exact)
    def sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One SDPA call per group of equal (query, key) lengths, see `ragged_sdpa`. `keys`/`values`
        `(sum K_i, Hkv, D)`: the rows' keys end to end in row order, padded keys included."""
        rows, groups = self.rows, self._sdpa_groups(keys.device)
        if self._plain is None:  # every row at the front of its own batch row
            self._plain = len(rows) == q.shape[0] and all(r.b == i and r.start == 0 for i, r in enumerate(rows))
        out = None if self._plain and len(groups) == 1 else q.new_zeros(q.shape)
        for t, idx, valid, where in groups:
            if out is None:  # every row, one shape: no gather/scatter
                qg = q[:, :, :t]
            elif self._plain:
                qg = q[idx, :, :t]
            else:
                qg = torch.stack([rows[i].heads(q) for i in idx])
            og = sdpa(qg, _group_keys(keys, where, len(idx)), _group_keys(values, where, len(idx)), valid)
            if out is None:
                return og if t == q.shape[2] else torch.nn.functional.pad(og, (0, 0, 0, q.shape[2] - t))
            if self._plain:
                out[idx, :, :t] = og
                continue
            for j, i in enumerate(idx):
                r = rows[i]
                out[r.b, :, r.start : r.start + t] = og[j]
        return out

    def _sdpa_groups(self, device: torch.device) -> list[_Group]:
        """`(query length, row indices, key mask or None when no key is padded, where the rows' keys
        are among all rows' keys end to end or None when the group is every row)` per group."""
        if self._groups is None:
            n_keys = [r.length for r in self.rows] if self.valids is None else [m.shape[0] for m in self.valids]
            starts = [0, *accumulate(n_keys)]
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, r in enumerate(self.rows):
                by_shape.setdefault((r.length, n_keys[i]), []).append(i)
            self._groups = []
            for (t, k), idx in by_shape.items():
                where = None
                if len(idx) < len(self.rows):
                    where = torch.cat([torch.arange(starts[i], starts[i] + k) for i in idx]).to(device)
                valid = None
                if self.valids is not None:
                    stacked = torch.stack([self.valids[i] for i in idx])
                    valid = None if bool(stacked.all()) else stacked
                self._groups.append((t, idx, valid, where))
        return self._groups

    # ------------------------------------------------------------------ varlen FlashAttention (GPU)
    def own_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The rows' tokens of a `(B, H, T, D)` tensor of the model call, end to end: `(sum T_i, H, D)`."""
        b, h, width, d = t.shape
        if self._tokens is None:
            self._all_tokens = sum(r.length for r in self.rows) == b * width  # no padding in the call
            flat = [torch.arange(r.length) + (r.b * width + r.start) for r in self.rows]
            self._tokens = torch.cat(flat).to(t.device)
        tokens = t.transpose(1, 2).reshape(b * width, h, d)
        return tokens if self._all_tokens else tokens.index_select(0, self._tokens)

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every row in one `varlen_attention` call. `k`/`v` `(sum K_i, Hkv, D)` are the rows' keys end
        to end, padded keys included: they are dropped here, which is the same as masking them.
        Returns `(B, Hq, T, D)` like `q`, zero where no row has a query."""
        plan = self._varlen_plan(q.device)
        if plan.keep is not None:
            k, v = k.index_select(0, plan.keep), v.index_select(0, plan.keep)
        packed = varlen_attention(self.own_tokens(q), k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k)
        b, h, width, d = q.shape
        if not self._all_tokens:  # put the rows' outputs back among the call's padding
            packed = q.new_zeros(b * width, h, d).index_copy_(0, self._tokens, packed)
        return packed.view(b, width, h, d).transpose(1, 2)

    def _varlen_plan(self, device: torch.device) -> _VarlenPlan:
        if self._varlen is None:
            n_queries = [r.length for r in self.rows]
            if self.valids is None:
                keep, n_keys = None, n_queries
            else:
                valid = torch.cat(self.valids).cpu()  # one device sync: the kernel takes the longest lengths as ints
                n_keys = [int(m.sum()) for m in valid.split([m.shape[0] for m in self.valids])]
                keep = None if bool(valid.all()) else valid.nonzero()[:, 0].to(device)
            self._varlen = _VarlenPlan(
                keep=keep,
                cu_q=_cu_seqlens(n_queries, device),
                cu_k=_cu_seqlens(n_keys, device),
                max_q=max(n_queries),
                max_k=max(n_keys),
            )
        return self._varlen


@dataclass
class _VarlenPlan:
    keep: torch.Tensor | None  # positions of the non-pad keys among the rows' keys end to end
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def ragged_sdpa(
    q: torch.Tensor,
    rows: list[_Row],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    valids: list[torch.Tensor],
) -> torch.Tensor:
    """Attention for rows of different lengths, each row computed exactly as if it ran alone.

    Why not pad-and-mask: padding a row's keys to the batch's longest row changes the reduction
    length of its softmax/PV sums, and CPU SDPA kernels then round differently (observed ~1e-5 on
    logits, enough to flip a near-tie in a top-k). Batch size and an all-true mask do not change
    results, so rows are grouped by (query length, key length) and each group is one SDPA call on
    unpadded tensors: a row's numbers depend only on its own tokens, never on who shares the batch.
    `q` `(B, Hq, T, D)` holds row i's queries at `rows[i].heads`; it attends to `keys[i]`
    `(Hkv, K_i, D)` whose `valids[i]` `(K_i,)` marks non-pad keys. Unused query slots return 0.
    Where `use_varlen(q)`, every row goes through one varlen FlashAttention call instead. One layer's
    form of `RowKeys`, which the attention contexts below keep for all layers of a forward.
    """
    layout = RowKeys(rows, valids)
    flat_k, flat_v = _end_to_end(keys), _end_to_end(values)
    return layout.varlen(q, flat_k, flat_v) if use_varlen(q) else layout.sdpa(q, flat_k, flat_v)


def _group_keys(keys: torch.Tensor, where: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A group's `(G, Hkv, K, D)` keys from all rows' keys end to end (`where` None: all of them).
    Contiguous, so SDPA sees the layout a stack of per-row tensors had (its results are bit-exact)."""
    picked = keys if where is None else keys.index_select(0, where)
    return picked.unflatten(0, (rows, -1)).transpose(1, 2).contiguous()


def _end_to_end(pieces: list[torch.Tensor]) -> torch.Tensor:
    """`(H, K_i, D)` pieces as one `(sum K_i, H, D)` tensor, the varlen kernels' packed layout."""
    return torch.cat([x.transpose(0, 1) for x in pieces])


def use_varlen(q: torch.Tensor) -> bool:
    """Whether `ragged_sdpa` runs all rows in one varlen FlashAttention call rather than SDPA per group.

    Only where such a kernel can run: flash-attn installed or torch >= 2.10, CUDA, fp16/bf16. One
    launch for the whole batch instead of one per distinct length; GPU kernels are not
    batch-invariant anyway, while the CPU keeps the per-group SDPA that makes a row's logits bit-identical in any batch.
    """
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_available()


def _cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    """The varlen kernels' cumulative sequence lengths `[0, l0, l0 + l1, ...]` (int32, on `device`)."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)


class RaggedAttention:
    """Full attention over each row's own tokens (no cache), invariant to batch composition."""

    def __init__(self, rows: list[_Row], valid: torch.Tensor | None) -> None:
        self.rows = rows
        self.valid = valid  # (B, T) of the model call, False = pad; None: no row has padding
        self.keys = RowKeys(rows, None if valid is None else [r.tokens(valid) for r in rows])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.keys.own_tokens(k), self.keys.own_tokens(v)  # a row's keys are its own tokens
        return self.keys.varlen(q, keys, values) if use_varlen(q) else self.keys.sdpa(q, keys, values)


class BatchedCacheAttention:
    """Per-row key sets for a batch where some rows read or write a sequence's KV cache.

    A reading row attends to its cache before the window, the window's new keys, its cache after
    (Fast-dLLM's prefix/dual order); other rows to their new keys. Caches are token-major,
    `(R * L, Hkv, D)` per layer, so every row's keys come out of one `cat` (the reading sequences'
    caches and the call's new keys) and one `index_select` with an index made at the first layer: the
    Python work per layer does not grow with the rows. (Slicing each row's pieces per layer cost ~35 us of host
    time per row and layer: ~40 ms per step at 32 rows x 32 layers, more than the GPU needs.)
    """

    def __init__(self, rows: list[_Row], new_valid: torch.Tensor) -> None:
        self.rows = rows
        self.new_valid = new_valid  # (B, T) of the model call
        self.keys: RowKeys | None = None  # set at the first layer, after its stores (which may allocate)
        self._caches: list[KVCache] = []  # the reading sequences' caches, each once
        self._gather: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, width, d = k.shape
        new_k = k.transpose(1, 2).reshape(b * width, h, d)  # token-major, like the caches
        new_v = v.transpose(1, 2).reshape(b * width, h, d)
        for r in self.rows:
            if r.spec.store_cache:
                self._store(layer, r, r.b * width + r.start, new_k, new_v)
        if self.keys is None:
            self.keys = RowKeys(self.rows, [self._valid(r) for r in self.rows])
            self._gather = self._gather_index(width, k.device)
        keys, values = self._end_to_end(layer, "keys", new_k), self._end_to_end(layer, "values", new_v)
        return self.keys.varlen(q, keys, values) if use_varlen(q) else self.keys.sdpa(q, keys, values)

    def _end_to_end(self, layer: int, kind: str, new: torch.Tensor) -> torch.Tensor:
        """Every row's keys (`kind="keys"`) or values in key order, rows end to end: `(sum K_i, Hkv, D)`."""
        caches = [getattr(kv, kind)[layer] for kv in self._caches]
        return torch.cat([*caches, new]).index_select(0, self._gather)

    def _gather_index(self, width: int, device: torch.device) -> torch.Tensor:
        """Where each row's keys are in `cat(reading rows' caches, the call's new keys)`."""
        at, cache_starts = 0, {}
        for r in self.rows:
            kv = r.seq.kv
            if r.spec.use_cache and id(kv) not in cache_starts:
                self._caches.append(kv)
                cache_starts[id(kv)] = at
                at += kv.keys[0].shape[0]
        parts = []
        for r in self.rows:
            own = torch.arange(r.length) + (at + r.b * width + r.start)
            if not r.spec.use_cache:
                parts.append(own)
                continue
            c = cache_starts[id(r.seq.kv)] + r.row * r.seq.length  # this row's canvas in its cache
            lo, hi = r.spec.offset, r.spec.offset + r.length
            parts += [torch.arange(c, c + lo), own, torch.arange(c + hi, c + r.seq.length)]
        return torch.cat(parts).to(device)

    def _valid(self, r: _Row) -> torch.Tensor:
        new = r.tokens(self.new_valid)
        if not r.spec.use_cache:
            return new
        kv = r.seq.kv
        if kv is None:
            raise RuntimeError("policy asked for a KV cache before building one (use store_cache first)")
        lo, hi = r.spec.offset, r.spec.offset + r.length
        return torch.cat([kv.valid[r.row, :lo], new, kv.valid[r.row, hi:]])

    def _store(self, layer: int, r: _Row, at: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the window's K/V (`k[at : at + r.length]` of the call's token-major keys) into the
        sequence's whole-canvas cache (allocated on first use).

        Positions outside the window keep what earlier forwards stored: Fast-dLLM's storing forwards
        cover the whole canvas, d3LLM's delayed cache appends blocks after a frozen prefix.
        """
        seq = r.seq
        if seq.kv is None:
            rows = r.spec.input_ids.shape[0]
            shape = (rows * seq.length, k.shape[1], k.shape[2])
            n_layers = seq.state["_num_layers"]
            seq.kv = KVCache(
                keys=[k.new_zeros(shape) for _ in range(n_layers)],
                values=[v.new_zeros(shape) for _ in range(n_layers)],
                valid=torch.zeros(rows, seq.length, dtype=torch.bool, device=k.device),
            )
        lo, hi = r.spec.offset, r.spec.offset + r.length
        base = r.row * seq.length
        seq.kv.keys[layer][base + lo : base + hi] = k[at : at + r.length]
        seq.kv.values[layer][base + lo : base + hi] = v[at : at + r.length]
        if layer == 0:  # the same for every layer
            seq.kv.valid[r.row, lo:hi] = r.tokens(self.new_valid)


def batched_forward(
    model: DiffusionModel, work: list[tuple[Sequence, ForwardSpec]], min_tokens: int = 0
) -> list[torch.Tensor]:
    """Run every spec in one model call; returns each spec's logits `(R, T, V)`.

    Rows of one length are a plain `(N, T)` batch (a single spec always is: the conformance path
    is the reference's own layout); rows of different lengths are packed into `(1, sum T)`.
    `min_tokens` pads the call with pad tokens until it has at least that many. Why: CPU GEMMs
    (MKL sgemm) take a different kernel / thread split when the row count M is small (measured
    with torch 2.13: M < 4 at 1 thread, M < 12 at 2, M < 28 at 16), so a tiny forward alone would
    round differently from the same tokens inside a bigger batch. Above that size every output row
    is computed the same way whatever M is, so padding small forwards makes a row's logits
    independent of batch size. 0 (the default: conformance, `generate`) pads nothing.
    """
    rows: list[_Row] = []
    for seq, spec in work:
        for r in range(spec.input_ids.shape[0]):
            rows.append(_Row(seq, spec, r, spec.input_ids.shape[1]))
    packed = len({r.length for r in rows}) > 1
    if packed:
        at = 0
        for r in rows:
            r.start, at = at, at + r.length
        shape = (1, max(at, min_tokens))
    else:
        for i, r in enumerate(rows):
            r.b = i
        shape = (len(rows), max(rows[0].length, -(-min_tokens // len(rows))))
    specs = [spec for _, spec in work]  # their (R, T) rows are the call's rows, in order
    ids = _lay_out([spec.input_ids for spec in specs], packed, shape, model.special_ids.pad)
    pos = _lay_out([spec.positions for spec in specs], packed, shape, 0)
    uses_cache = any(s.use_cache or s.store_cache for _, s in work)
    valid = None  # no row has padding (caches keep their own validity, so those calls lay it out)
    if uses_cache or any(spec.valid is not None for _, spec in work):
        valid = _lay_out([_row_mask(r, r.spec.valid) for r in rows], packed, shape, False)
    if uses_cache:
        for seq, spec in work:
            if spec.store_cache:  # its window's K/V replace those positions; the rest stay (see `_store`)
                seq.state["_num_layers"] = model.num_layers
        attention: AttentionContext = BatchedCacheAttention(rows, valid)
    elif not packed and rows[0].length == shape[1]:  # one shape, no padding: a plain batch is exact
        attention = KeyMaskAttention(None if valid is None or bool(valid.all()) else valid)
    else:
        attention = RaggedAttention(rows, valid)
    if not any(spec.logits_at is not None for _, spec in work):
        logits = model(ids, pos, attention)
        out, i = [], 0
        for seq, spec in work:
            n, t = spec.input_ids.shape
            if packed:
                out.append(torch.stack([r.tokens(logits) for r in rows[i : i + n]]))
            else:
                out.append(logits[i : i + n, :t])
            i += n
        return out

    index, counts = _logits_index(rows, packed, shape, min_tokens)
    # a row's chunk is (1, n, V) for its `logits_at`, else (1, T, V): a spec of one row takes its chunk as is
    selected = model(ids, pos, attention, logits_index=index)[None].split(counts, dim=1)
    out, i = [], 0
    for _, spec in work:
        n = spec.input_ids.shape[0]
        out.append(selected[i] if n == 1 else torch.cat(selected[i : i + n]))
        i += n
    return out


#: the LM head never runs on fewer positions than this: small GEMMs take other CPU kernels (see
#: `batched_forward`), and the selected positions' logits must equal a full-canvas head's
MIN_HEAD_ROWS = 64


def _logits_index(
    rows: list[_Row], packed: bool, shape: tuple[int, int], min_tokens: int
) -> tuple[torch.Tensor, list[int]]:
    """Flat `(B·T)` indices of the positions whose logits the rows' policies read, and per-row counts.

    A row without `logits_at` wants all its positions. The index is padded with position 0 (its
    logits are dropped) to `max(min_tokens, MIN_HEAD_ROWS)` entries, for the reason above. One
    `nonzero` over the call's layout (rows lie in order in it) and one read-back of the counts,
    whatever the number of rows: on an accelerator each is a host sync.
    """
    wanted = _lay_out([_row_mask(r, r.spec.logits_at) for r in rows], packed, shape, False).flatten()
    index = wanted.nonzero()[:, 0]
    row_starts = [r.b * shape[1] + r.start for r in rows] + [wanted.numel()]
    bounds = torch.searchsorted(index, torch.tensor(row_starts, device=index.device)).tolist()
    counts = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    short = max(min_tokens, MIN_HEAD_ROWS) - index.numel()
    if short > 0:
        index = torch.cat([index, index.new_zeros(short)])
        counts.append(short)
    return index, counts


def _row_mask(r: _Row, mask: torch.Tensor | None) -> torch.Tensor:
    """Row `r.row` of a spec's `(R, T)` bool mask; None (no padding / every position) is all True."""
    if mask is None:
        return torch.ones(r.length, dtype=torch.bool, device=r.spec.input_ids.device)
    return mask if mask.dim() == 1 else mask[r.row]


def _lay_out(parts: list[torch.Tensor], packed: bool, shape: tuple[int, int], fill: int | bool) -> torch.Tensor:
    """The rows in the model call's layout: end to end in one row (`packed`) or one per batch row;
    what the rows leave free (padding up to `shape`) is `fill`. `parts`: each row's `(T,)` tensor, or
    each spec's `(R, T)` block of rows (then no per-row view is made: ~1-2 us each, every step)."""
    if parts[0].dim() == 2:
        laid = torch.cat([p.reshape(-1) for p in parts])[None] if packed else torch.cat(parts)
    else:
        laid = torch.cat(parts)[None] if packed else torch.stack(parts)
    free = shape[1] - laid.shape[1]
    if free:
        laid = torch.cat([laid, laid.new_full((shape[0], free), fill)], dim=1)
    return laid


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
    min_tokens: int = 0,
) -> StepResult:
    """One engine step: plan every sequence, one batched forward, commit every sequence.

    Sequences whose policy has nothing left to do are marked finished without a forward.
    Without `on_error` any exception propagates (conformance, `generate`). With it (the serving
    engine) a failing `plan`/`commit` finishes only its own sequence, and a failing batched forward
    is retried one sequence at a time so that only the sequence that breaks it fails.
    `min_tokens`: see `batched_forward` (the engine uses it for batch-size invariance).
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
            logits = batched_forward(model, [(s, f) for s, f, _ in work], min_tokens)
    except Exception as exc:
        if on_error is None:
            raise
        if len(work) == 1:
            _fail(work[0][0], exc, on_error)
            return StepResult()
        work, logits = _isolate_forward(model, work, on_error, min_tokens)
    result = StepResult()
    for seq, spec, _ in work:
        seq.nfe += 1
        result.sequences += 1
        result.rows += spec.input_ids.shape[0]
        result.tokens += spec.input_ids.numel() if spec.valid is None else int(spec.valid.sum())
    for i in _commit_batched(work, logits, on_error):
        seq, _, policy = work[i]
        try:
            policy.commit(seq, logits[i])
        except Exception as exc:
            if on_error is None:
                raise
            _fail(seq, exc, on_error)
    return result


def _commit_batched(
    work: list[tuple[Sequence, ForwardSpec, DecodingPolicy]], logits: list[torch.Tensor], on_error: ErrorHandler | None
) -> list[int]:
    """Each policy class commits its sequences together (`DecodingPolicy.commit_many`); returns the
    indices of `work` still to commit one by one. A class whose batched commit raises has written
    nothing (the method's contract), so its sequences are retried one by one and only a failing one fails."""
    by_class: dict[type, list[int]] = {}
    for i, (_, _, policy) in enumerate(work):
        by_class.setdefault(type(policy), []).append(i)
    left = []
    for cls, indices in by_class.items():
        try:
            rest = cls.commit_many([(work[i][2], work[i][0], logits[i]) for i in indices])
        except Exception:
            if on_error is None:
                raise
            logger.warning("batched commit of %s failed, retrying one by one", cls.__name__, exc_info=True)
            rest = range(len(indices))
        left += [indices[r] for r in rest]
    return sorted(left)


def _fail(seq: Sequence, exc: Exception, on_error: ErrorHandler) -> None:
    seq.finished = True
    on_error(seq, exc)


def _isolate_forward(
    model: DiffusionModel,
    work: list[tuple[Sequence, ForwardSpec, DecodingPolicy]],
    on_error: ErrorHandler,
    min_tokens: int,
) -> tuple[list[tuple[Sequence, ForwardSpec, DecodingPolicy]], list[torch.Tensor]]:
    """Re-run a failed batched forward one sequence at a time; only failing sequences are dropped."""
    kept, logits = [], []
    for item in work:
        try:
            with torch.inference_mode():
                logits.append(batched_forward(model, [(item[0], item[1])], min_tokens)[0])
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
