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
from dllm_runtime.decoding.dream import DreamPolicy, DreamSettings
from dllm_runtime.decoding.fast_dllm import FastDLLMConfig, FastDLLMPolicy
from dllm_runtime.decoding.llada import LLaDAConfig, LLaDAPolicy
from dllm_runtime.decoding.primitives import threshold_choice, top_k_choice
from dllm_runtime.engine.step import run_step, run_to_completion
from dllm_runtime.models.dream import dream_position_ids
from tests.runtime.golden_replay import new_seq, one_thread, tiny_model  # noqa: F401

V = 256


def full_row(confidence: list[float]) -> torch.Tensor:
    """One sequence's candidates laid out as the references see them: among non-candidate slots."""
    return torch.tensor([-torch.inf] * 3 + confidence + [-torch.inf] * 2)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6])
def test_top_k_choice_picks_what_topk_over_the_full_row_picks(k: int) -> None:
    confidence = torch.rand(5, generator=torch.Generator().manual_seed(k)).tolist()
    choice = top_k_choice(confidence, k)
    expected = torch.zeros(10, dtype=torch.bool)
    expected[torch.topk(full_row(confidence), min(k, 5)).indices] = True  # past 5: -inf slots, no commit
    assert choice == expected[3:8].tolist()


def test_top_k_choice_declines_a_tied_boundary_and_nan() -> None:
    assert top_k_choice([0.9, 0.5, 0.5, 0.1], 2) is None  # topk's tie order would decide
    assert top_k_choice([0.9, 0.5, 0.5, 0.1], 3) == [True, True, True, False]  # a tie inside the top is fine
    assert top_k_choice([0.5, 0.5], 2) == [True, True]
    assert top_k_choice([0.9, float("nan"), 0.1], 1) is None


def test_threshold_choice_adds_the_first_most_confident() -> None:
    assert threshold_choice([0.2, 0.7, 0.1, 0.7], 0.9) == [False, True, False, False]  # argmax: first maximum
    assert threshold_choice([0.95, 0.7, 0.91], 0.9) == [True, False, True]
    assert threshold_choice([], 0.9) == []
    assert threshold_choice([0.2, float("nan")], 0.9) is None


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


def dream(alg: str, temperature: float = 0.0) -> DreamPolicy:
    return DreamPolicy(DreamSettings(steps=16, alg=alg, temperature=temperature), dream_position_ids)


@pytest.mark.parametrize(
    ("make", "make_sampled"),
    [
        (lambda: LLaDAPolicy(LLaDAConfig(steps=12, block_length=8)),
         lambda: LLaDAPolicy(LLaDAConfig(steps=12, block_length=8, temperature=0.7))),
        (lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5)),
         lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5, temperature=0.7))),
        (lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, threshold=0.5, cache="dual")),
         lambda: FastDLLMPolicy(FastDLLMConfig(steps=24, block_length=8, factor=1.0))),
        (lambda: FastDLLMPolicy(FastDLLMConfig(steps=12, block_length=8)),  # fixed quota
         lambda: FastDLLMPolicy(FastDLLMConfig(steps=12, block_length=8, remasking="random"))),
        (lambda: dream("entropy"), lambda: dream("entropy", temperature=0.7)),
        (lambda: dream("maskgit_plus"), lambda: dream("origin")),
        (lambda: dream("topk_margin"), lambda: dream("maskgit_plus", temperature=0.5)),
    ],
    ids=["llada", "fast_dllm-threshold", "fast_dllm-dual", "fast_dllm-quota", "dream-entropy",
         "dream-maskgit_plus", "dream-topk_margin"],
)
def test_commit_many_equals_commit_per_sequence(make, make_sampled) -> None:
    gen = torch.Generator().manual_seed(1)
    items, alone = [], []
    for i, (prompt_len, slots, steps_done) in enumerate([(5, 32, 0), (9, 16, 3), (3, 32, 5), (12, 8, 1), (7, 24, 4)]):
        policy = make()
        seq, spec = planned(policy, prompt_len, slots, i, steps_done, gen)
        logits = logits_with_ties(spec, gen)
        items.append((policy, seq, logits))
        alone.append(copy.deepcopy((policy, seq, logits)))
    sampled = make_sampled()  # not greedy: left to `commit`
    seq, spec = planned(sampled, 4, 24, 9, 0, gen)
    items.append((sampled, seq, logits_with_ties(spec, gen)))
    alone.append(copy.deepcopy(items[-1]))

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
