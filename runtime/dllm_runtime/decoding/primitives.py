"""Building blocks shared by the LLaDA-family decoders (ALGORITHMS.md §0.1, §1.1, §1.2).

Each function reproduces one reference helper *operation for operation* (same dtypes, same tensor
shapes, same tie-breaking ops), because the golden cases are token-exact: a softmax in a different
precision or a `topk` over a shorter row can change which of two equal confidences wins.
Every random draw goes through the sequence's `RandomSource`, in the reference's call order.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import Any

import torch

from dllm_runtime.decoding.base import RandomSource, Sequence


def gumbel(logits: torch.Tensor, temperature: float, rng: RandomSource) -> torch.Tensor:
    """`add_gumbel_noise`: argmax of the result samples softmax(logits / T).

    At T == 0 the *same* tensor is returned (no copy, no draw): later in-place edits of the
    reference hit both, which `confidence_eos_eot_inf` relies on. Otherwise one float64 uniform
    draw of the full logits shape.
    """
    if temperature == 0:
        return logits
    logits64 = logits.to(torch.float64)
    noise = rng.rand(tuple(logits64.shape), torch.float64, logits64.device)
    return logits64.exp() / (-torch.log(noise)) ** temperature


def truncate(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """vLLM-style top-k / top-p filtering of `(n, V)` logits: excluded entries become -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p` (always at
    least the most likely one). No upstream LLaDA-family sampler has these knobs; they only shape the
    sampling distribution at T > 0 (at T = 0 the argmax is always kept, so they change nothing).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(ordered.float(), dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(ordered.float(), dim=-1) >= top_p  # mass before it suffices
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def gumbel_argmax(
    selected: torch.Tensor,
    temperature: float,
    rng: RandomSource,
    full_shape: tuple[int, ...],
    candidates: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """`argmax(gumbel(logits, T))` evaluated only at the `candidates` positions.

    `selected` is `logits[candidates]` `(n, V)`. The references perturb and reduce the whole
    `(B, L, V)` canvas although only masked positions of the current block can be committed; every
    op involved is per position, so computing the n candidate rows gives the same tokens at a
    fraction of the memory traffic. The noise is still drawn for the full shape, so the RNG stream
    (and thus every later draw) matches the reference.
    """
    if temperature == 0:
        return torch.argmax(selected, dim=-1)
    noise = rng.rand(full_shape, torch.float64, selected.device)[candidates]
    selected = truncate(selected, top_k, top_p)
    return torch.argmax(selected.to(torch.float64).exp() / (-torch.log(noise)) ** temperature, dim=-1)


def scatter_candidates(
    x: torch.Tensor, candidates: torch.Tensor, x0_sel: torch.Tensor, conf_sel: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-canvas `(x0, confidence)`: predictions at candidates, `x` and `floor` elsewhere.

    Equals the references' `where(M, x0, x)` / `where(M, conf, floor)`; sorting and `topk` then run
    over full rows, so tie order is the reference's. `masked_scatter` fills the candidates in
    row-major order, as boolean-index assignment would, without materialising their indices (one
    op, no host sync on an accelerator: this runs for every sequence at every step).
    """
    x0 = x.masked_scatter(candidates, x0_sel)
    conf = torch.full(x.shape, floor, dtype=conf_sel.dtype, device=x.device).masked_scatter_(candidates, conf_sel)
    return x0, conf


def apply_transfer(x: torch.Tensor, transfer: torch.Tensor, x0: torch.Tensor) -> None:
    """`x[transfer] = x0[transfer]` in place (x may be a view of the canvas), as one `where`."""
    x.copy_(torch.where(transfer, x0, x))


def quota(num_masked: int, steps: int) -> list[int]:
    """Per-step token budget: `num_masked` spread over `steps`, the FIRST `r` steps get one extra."""
    if steps <= 0:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    base, rem = divmod(int(num_masked), steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def gather_prob(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`probs[..., tokens]` -> `(B, L)`."""
    return torch.gather(probs, dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)


def topk_rows(confidence: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """LLaDA's per-row selection: `topk(confidence[j], k_j)` over the FULL row -> bool `(B, L)`."""
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    for j, k in enumerate(counts):
        if k > 0:
            _, idx = torch.topk(confidence[j], k=int(k))
            transfer[j, idx] = True
    return transfer


# ---------------------------------------------------------------------------- batched greedy commits
# The greedy (T = 0) step of many sequences at once: one scoring pass (argmax, softmax, ...) over
# every candidate row of the batch, one read of the confidences, then each sequence's rule picks its
# slots on the host (a few comparisons each, where tensor ops would cost a kernel call per op), one
# write per canvas. A rule picks exactly what the reference's op over the sequence's own row picks;
# where that op would decide by its tie order, the rule declines and the sequence runs the reference op.

#: candidate logits `(N, V)` -> `(token, confidence)` per row, as the reference scores them
Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def argmax_probability(prob_dtype: torch.dtype | None = None) -> Scorer:
    """LLaDA-family scoring: the argmax token and its softmax probability (softmax in `prob_dtype`,
    None = the logits' own dtype)."""

    def score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.argmax(logits, dim=-1)
        return tokens, gather_prob(torch.softmax(logits.to(prob_dtype or logits.dtype), dim=-1), tokens)

    return score


class GreedyCommits:
    """The greedy members of one `commit_many` call (`items[i]` for i in `members`): each candidate
    row's token, and per member its candidates' confidences as Python floats."""

    @classmethod
    def collect(
        cls,
        items: list[tuple[Any, Sequence, torch.Tensor]],
        score: Scorer,
        rows: Callable[[Any, Sequence, torch.Tensor], torch.Tensor] | None = None,
        members: list[int] | None = None,
    ) -> GreedyCommits | None:
        """The items whose policy is `greedy` (or `members`), or None when fewer than two are (alone,
        a policy's own `commit` takes fewer ops). `rows(policy, seq, logits)`: a member's candidate
        rows `(n, V)`; None: its logits' first row, `(n, V)` at `ForwardSpec.logits_at`."""
        if members is None:
            members = [i for i, (policy, _, _) in enumerate(items) if policy.greedy]
        if len(members) < 2:
            return None
        return cls(items, members, score, rows)

    def __init__(
        self,
        items: list[tuple[Any, Sequence, torch.Tensor]],
        members: list[int],
        score: Scorer,
        rows: Callable[[Any, Sequence, torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.items, self.members = items, members
        self.policies = [items[i][0] for i in members]
        self.seqs = [items[i][1] for i in members]
        if rows is None:  # first rows, joined along the positions: no per-member view to make
            first_rows = [items[i][2][:1] if items[i][2].shape[0] > 1 else items[i][2] for i in members]
            self.counts = [c.shape[1] for c in first_rows]
            candidates = torch.cat(first_rows, dim=1)[0]
        else:
            per_member = [rows(*items[i]) for i in members]
            self.counts = [c.shape[0] for c in per_member]
            candidates = torch.cat(per_member)
        self.tokens, confidence = score(candidates)
        flat = confidence.tolist()
        starts = [0, *accumulate(self.counts)]
        self.confidence: list[list[float]] = [flat[lo:hi] for lo, hi in zip(starts, starts[1:])]

    def write(self, chosen: dict[int, list[bool]], places: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        """Commit member j's `chosen[j]` candidates into `places[j]` = `(canvas view, its candidate
        mask)`; members without a choice are skipped. Returns those written."""
        flags = bytearray(flag for j, n in enumerate(self.counts) for flag in chosen.get(j, [False] * n))
        if not flags:  # no member has a candidate: nothing to write
            return sorted(chosen)
        # from the bytes, not `torch.tensor(list)`: that converts element by element (~25 us for 128 flags)
        picked = torch.frombuffer(flags, dtype=torch.bool).to(self.tokens.device)
        values = torch.where(picked, self.tokens, self.seqs[0].special.mask)
        segments = values.split(self.counts)  # unchosen candidates stay masked
        for j in chosen:
            target, candidates = places[j]
            target.masked_scatter_(candidates, segments[j])
        return sorted(chosen)

    def left(self, written: list[int]) -> list[int]:
        """The indices of `items` still to commit one by one."""
        return sorted({*range(len(self.items))} - {self.members[j] for j in written})


def top_k_choice(confidence: list[float], k: int) -> list[bool] | None:
    """The `k` most confident candidates (all when `k` >= their number): what `topk` over the
    sequence's full row picks (non-candidates there are -inf). None when the k-th and (k+1)-th
    largest are equal or a NaN is present: then `topk`'s own tie order decides."""
    n, k = len(confidence), max(0, min(k, len(confidence)))
    if k in (0, n):
        return [k > 0] * n
    ranked = sorted(confidence, reverse=True)
    cut = ranked[k - 1]
    if ranked[k] == cut or _has_nan(confidence):
        return None
    return [c >= cut for c in confidence]


def _has_nan(values: list[float]) -> bool:
    """Whether a NaN is among `values`, by their sum (one C loop, where a generator costs ~1 us per
    call at every step): a NaN makes it NaN. So does `inf + -inf`, which only sends the sequence to
    the reference op, never to a wrong choice."""
    total = sum(values)
    return total != total


def threshold_choice(confidence: list[float], threshold: float) -> list[bool] | None:
    """Fast-dLLM's threshold rule: every candidate at or above `threshold`, plus the first most
    confident one (`argmax`). None with a NaN present (`argmax` ranks it first; let the reference op)."""
    if _has_nan(confidence):
        return None
    flags = [c >= threshold for c in confidence]
    if confidence:
        flags[confidence.index(max(confidence))] = True
    return flags


def fast_predict(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    mask: torch.Tensor,
    x: torch.Tensor,
    rng: RandomSource,
    random_dtype: torch.dtype,
    floor: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's shared prologue: `x0` and its confidence (`floor` where not masked), `(B, L)` each.

    `logits` are the window's `(B, L, V)`, or `(n, V)` already at the `mask` positions (what the
    step loop returns for `ForwardSpec.logits_at`). Confidence = float64 softmax probability of
    `x0`, or U[0,1) `(B, L)` drawn after the Gumbel noise for random remasking (float64 in the
    threshold/fixed rule, float32 in the factor rule).
    """
    selected = logits[mask] if logits.dim() == 3 else logits
    full_shape = (*mask.shape, logits.shape[-1])  # the reference's draws are for the whole window
    x0_sel = gumbel_argmax(selected, temperature, rng, full_shape, mask, top_k, top_p)
    if remasking == "low_confidence":
        conf_sel = gather_prob(torch.softmax(selected.to(torch.float64), dim=-1), x0_sel)
    elif remasking == "random":
        conf_sel = rng.rand(tuple(x.shape), random_dtype, x.device)[mask]
    else:
        raise ValueError(f"remasking: unknown mode {remasking!r}")
    return scatter_candidates(x, mask, x0_sel, conf_sel, floor)


def transfer_fixed_or_threshold(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    mask: torch.Tensor,
    x: torch.Tensor,
    k: list[int] | None,
    threshold: float | None,
    rng: RandomSource,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM `get_transfer_index` (vectorised form): returns `(x0, transfer)`, both `(B, L)`.

    Threshold: every masked position with confidence >= threshold, plus each row's most confident
    masked position. Fixed: the first `k[row]` positions of a descending sort of the full row.
    """
    floor = torch.finfo(torch.float64).min
    x0, conf = fast_predict(logits, temperature, remasking, mask, x, rng, torch.float64, floor, top_k, top_p)
    if threshold is not None:
        transfer = mask & (conf >= threshold)
        best = torch.zeros_like(transfer).scatter_(1, torch.argmax(conf, dim=1, keepdim=True), True)
        return x0, (transfer | best) & mask
    if k is None:
        raise ValueError("a fixed-quota transfer needs per-row token counts")
    _, order = torch.sort(conf, dim=1, descending=True)
    rows, length = conf.shape
    cols = torch.arange(length, device=conf.device).unsqueeze(0).expand(rows, length)
    counts = torch.tensor(k, dtype=torch.long, device=conf.device).clamp(min=0).unsqueeze(1)
    selected = torch.zeros(rows, length, dtype=torch.int8, device=conf.device)
    selected = selected.scatter(1, order, (cols < counts).to(torch.int8))
    return x0, selected.bool() & mask


def factor_count(sorted_conf: torch.Tensor, factor: float) -> int:
    """How many of `n` masked tokens the factor rule commits (ALGORITHMS.md §1.2 `transfer_factor`).

    The longest prefix with `s_i >= 1 - factor/(i+2)` (rank 0 always passes); a first failure at the
    last rank still takes all `n`, exactly as the reference's loop-index arithmetic does.
    Comparisons are tensor-vs-Python-float, so they run in the confidences' dtype like upstream.
    """
    n = len(sorted_conf)
    thresholds = [1 - factor / (i + 2) for i in range(n)]
    thresholds[0] = -1.0
    top = 0
    for top in range(n):
        if bool(sorted_conf[top] < thresholds[top]):
            break
    if top == 0 or top == n - 1:
        top += 1
    return top


def transfer_factor(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    mask: torch.Tensor,
    x: torch.Tensor,
    factor: float,
    rng: RandomSource,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM `get_transfer_index_dynamic`: per row, `topk(conf, factor_count(...))`."""
    random_dtype = torch.float32  # upstream's factor rule draws default-dtype uniforms
    x0, conf = fast_predict(logits, temperature, remasking, mask, x, rng, random_dtype, -torch.inf, top_k, top_p)
    counts = []
    for j in range(conf.shape[0]):
        n = int(mask[j].sum())
        if n == 0:
            counts.append(0)
            continue
        ranked = torch.sort(conf[j][mask[j]], dim=-1, descending=True)[0]
        counts.append(factor_count(ranked, factor))
    return x0, topk_rows(conf, counts)
