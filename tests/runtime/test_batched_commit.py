"""Batched commits (`DecodingPolicy.commit_many`) against the per-sequence `commit` they replace.

The step loop commits a batch's greedy sequences together; every sequence must end up exactly as its
own `commit` would leave it, including when a quota boundary is a tie (then the reference's `topk`
decides, so the sequence is handed back to `commit`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from dllm_runtime.decoding.base import DecodingPolicy, Sequence
from dllm_runtime.decoding.fast_dllm import FastDLLMConfig, FastDLLMPolicy
from dllm_runtime.decoding.llada import LLaDAConfig, LLaDAPolicy
from dllm_runtime.decoding.primitives import first_max_segments, top_k_segments
from dllm_runtime.engine.step import run_step, run_to_completion
from tests.runtime.golden_replay import new_seq, one_thread, tiny_model  # noqa: F401

V = 256


def full_rows(conf: torch.Tensor, counts: list[int], floor: float) -> torch.Tensor:
    """Each segment in a row of its own, after a few non-candidate slots and with more after it,
    as the references lay confidences out over the whole canvas."""
    rows = torch.full((len(counts), 3 + max(counts, default=0) + 2), floor, dtype=conf.dtype)
    for i, segment in enumerate(conf.split(counts)):
        rows[i, 3 : 3 + len(segment)] = segment
    return rows


def test_top_k_segments_match_topk_over_full_rows_and_report_tied_boundaries() -> None:
    gen = torch.Generator().manual_seed(0)
    counts, ks = [5, 0, 7, 3, 6, 4], [2, 1, 7, 0, 3, 9]
    conf = torch.rand(sum(counts), generator=gen)
    conf[16:22] = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1, 0.2])  # segment 4: 3rd and 4th largest tie
    chosen, tied = top_k_segments(conf, counts, ks)
    assert tied == [4]
    rows = full_rows(conf, counts, -torch.inf)
    picked = full_rows(chosen.float(), counts, 0.0).bool()
    for i, (n, k) in enumerate(zip(counts, ks)):
        if i in tied:
            continue
        expected = torch.zeros_like(picked[i])
        if min(k, n):  # beyond the candidates `topk` picks -inf slots, which commit nothing
            expected[torch.topk(rows[i], min(k, n)).indices] = True
        assert torch.equal(picked[i], expected), i


def test_first_max_segments_takes_the_first_of_equal_maxima_like_argmax() -> None:
    counts = [4, 0, 3, 1]
    conf = torch.tensor([0.2, 0.7, 0.1, 0.7, 0.3, 0.3, 0.3, 0.0], dtype=torch.float64)
    chosen = first_max_segments(conf, counts)
    assert chosen.tolist() == [False, True, False, False, True, False, False, True]
    rows = full_rows(conf, counts, torch.finfo(torch.float64).min)
    flags = full_rows(chosen.double(), counts, 0.0)
    for i, n in enumerate(counts):
        if n:
            assert flags[i, torch.argmax(rows[i])] == 1


def logits_with_ties(spec, gen: torch.Generator) -> torch.Tensor:
    """Random candidate logits `(1, n, V)` in which candidate rows repeat, so confidences tie."""
    n = int(spec.logits_at.sum())
    rows = 3 * torch.randn(max(1, n // 2), V, generator=gen)  # some confidences above 0.5, some below
    return rows[torch.arange(n) % rows.shape[0]][None]


def planned(policy: DecodingPolicy, prompt_len: int, slots: int, seed: int, steps_done: int, gen: torch.Generator):
    """A sequence `steps_done` steps into its decode, its next step planned: `(sequence, spec)`."""
    seq = new_seq(list(range(10, 10 + prompt_len)), slots, seed)
    policy.init(seq)
    for _ in range(steps_done):
        policy.commit(seq, logits_with_ties(policy.plan(seq), gen))
    spec = policy.plan(seq)
    assert spec is not None, "test setup: the sequence must still be decoding"
    return seq, spec


@pytest.mark.parametrize(
    "make",
    [
        lambda: LLaDAPolicy(LLaDAConfig(steps=12, block_length=8)),
        lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5)),
        lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5, cache="dual")),
        lambda: FastDLLMPolicy(FastDLLMConfig(steps=12, block_length=8)),  # fixed quota
    ],
    ids=["llada", "fast_dllm-threshold", "fast_dllm-dual", "fast_dllm-quota"],
)
def test_commit_many_equals_commit_per_sequence(make) -> None:
    gen = torch.Generator().manual_seed(1)
    items, alone = [], []
    for i, (prompt_len, slots, steps_done) in enumerate([(5, 32, 0), (9, 16, 3), (3, 32, 5), (12, 8, 1), (7, 24, 4)]):
        policy = make()
        seq, spec = planned(policy, prompt_len, slots, i, steps_done, gen)
        logits = logits_with_ties(spec, gen)
        items.append((policy, seq, logits))
        alone.append(copy.deepcopy((policy, seq, logits)))
    sampled = make()  # not greedy: left to `commit`
    if isinstance(sampled, LLaDAPolicy):
        sampled = LLaDAPolicy(LLaDAConfig(steps=12, block_length=8, temperature=0.7))
    else:
        sampled = FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5, temperature=0.7))
    seq, spec = planned(sampled, 4, 24, 9, 0, gen)
    items.append((sampled, seq, logits_with_ties(spec, gen)))

    left = type(items[0][0]).commit_many(items)
    assert len(items) - 1 in left and len(left) < len(items)  # the batch path took some, not the sampler
    for i in left:
        policy, seq, logits = items[i]
        policy.commit(seq, logits)
    for (_, seq, _), (policy, by_hand, logits) in zip(items, alone):
        policy.commit(by_hand, logits)
        assert torch.equal(seq.canvas, by_hand.canvas)
        assert seq.state.keys() == by_hand.state.keys()
        for key, value in seq.state.items():
            other = by_hand.state[key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_a_failing_batched_commit_falls_back_to_commit_one_by_one(monkeypatch, one_thread: None) -> None:  # noqa: F811
    model = tiny_model("llada_tiny")

    def batch() -> list[tuple[Sequence, DecodingPolicy]]:
        config = LLaDAConfig(steps=16, block_length=8)
        return [(new_seq([3 + i] * (4 + i), 16, i), LLaDAPolicy(config)) for i in range(3)]

    expected = batch()
    run_to_completion(model, expected)

    def broken(cls, items):
        raise RuntimeError("injected")

    monkeypatch.setattr(LLaDAPolicy, "commit_many", classmethod(broken))
    errors: list[Exception] = []
    got = batch()
    for seq, policy in got:
        policy.init(seq)
    while not all(seq.finished for seq, _ in got):
        run_step(model, got, on_error=lambda seq, exc: errors.append(exc))
    assert not errors
    assert all(torch.equal(a.canvas, b.canvas) for (a, _), (b, _) in zip(got, expected))
    fresh = batch()
    for seq, policy in fresh:
        policy.init(seq)
    with pytest.raises(RuntimeError, match="injected"):  # without an error handler nothing is hidden
        run_step(model, fresh)
