"""Dream `diffusion_generate` policy against the golden vectors (tests/golden/dream_golden.json).

Every case runs through the real step loop twice: with the recorded per-forward logits (decoder in
isolation: same forward inputs, same output, same NFE, same per-step transfer counts) and with the
real tiny Dream model (end to end). Sampling cases reproduce the reference's draws by seeding the
sequence's `RandomSource` with `seed_before_call`.
"""

from __future__ import annotations

import pytest
import torch

from dllm_runtime.decoding.base import RandomSource
from dllm_runtime.decoding.dream import DreamPolicy, DreamSettings, dream_position_ids, sample_tokens
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine.step import run_to_completion
from tests.runtime.golden_replay import (
    TINY_SPECIAL,
    ReplayModel,
    golden_cases,
    golden_tensors,
    new_seq,
    output_of,
    run_case,
    tiny_model,
)

CASES = sorted(golden_cases("dream"))


def test_golden_set_is_complete() -> None:
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_replayed_logits_reproduce_reference(name: str) -> None:
    case = golden_cases("dream")[name]
    model = ReplayModel(case, golden_tensors("dream"), shift=True)
    seqs, _ = run_case(case, model)
    assert model.calls == len(case["trace"]) == case["nfe"]
    assert output_of(seqs) == case["output"]
    assert all(seq.nfe == case["nfe"] for seq in seqs)
    per_step = [list(row) for row in zip(*(seq.state["unmasked_per_step"] for seq in seqs))]
    assert per_step == case["tokens_unmasked_per_step"]


@pytest.mark.parametrize("name", CASES)
def test_tiny_model_end_to_end(name: str) -> None:
    case = golden_cases("dream")[name]
    seqs, _ = run_case(case, tiny_model("dream_tiny"))
    assert output_of(seqs) == case["output"]
    assert all(seq.nfe == case["nfe"] for seq in seqs)


def test_position_rule_matches_model() -> None:
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    assert torch.equal(dream_position_ids(valid), tiny_model("dream_tiny").position_ids(valid))
    assert dream_position_ids(valid)[0].tolist() == [1, 1, 0, 1, 2]


def test_schedule_counts_are_float32() -> None:
    """32 slots over 16 steps commit [1, 2 x 14, 3] (ALGORITHMS.md §1.3); the golden cases pin it."""
    case = golden_cases("dream")["dream_entropy_t0"]
    seqs, _ = run_case(case, ReplayModel(case, golden_tensors("dream"), shift=True))
    assert seqs[0].state["unmasked_per_step"] == [1] + [2] * 14 + [3]


def test_batch_independence_of_seeded_sampling() -> None:
    """A sampled request gives the same tokens alone and next to another request (per-request RNG)."""
    model = tiny_model("dream_tiny")
    settings = DreamSettings(steps=8, alg="entropy", temperature=0.7, top_p=0.9)
    policy = DreamPolicy(settings, model.position_ids)

    alone = new_seq([248, 17, 99, 3], 16, seed=5)
    run_to_completion(model, [(alone, policy)])
    a, b = new_seq([248, 17, 99, 3], 16, seed=5), new_seq([248, 40, 41, 42], 16, seed=6)
    run_to_completion(model, [(a, policy), (b, policy)])
    assert torch.equal(alone.canvas, a.canvas)
    assert not (a.canvas == TINY_SPECIAL.mask).any()


def test_head_runs_only_on_the_rows_that_predict_masked_slots() -> None:
    """Each step asks for row p-1 of every masked slot p (Dream's shift), not the whole canvas, and
    decoding from the full head's logits at those rows gives the step loop's (selective head) tokens."""
    model = tiny_model("dream_tiny")
    policy = DreamPolicy(DreamSettings(steps=8, alg="entropy"), model.position_ids)
    by_hand = new_seq([248, 17, 99, 3], 16)
    policy.init(by_hand)
    while (spec := policy.plan(by_hand)) is not None:
        masked = (by_hand.canvas[0] == TINY_SPECIAL.mask).nonzero().squeeze(1)
        assert spec.logits_at is not None
        assert spec.logits_at.nonzero().squeeze(1).tolist() == (masked - 1).tolist()
        with torch.no_grad():
            policy.commit(by_hand, model(spec.input_ids, spec.positions)[:, spec.logits_at])
    stepped = new_seq([248, 17, 99, 3], 16)
    run_to_completion(model, [(stepped, policy)])
    assert torch.equal(by_hand.canvas, stepped.canvas)
    assert not (stepped.canvas == TINY_SPECIAL.mask).any()


def test_build_policy_from_params_serves_dream() -> None:
    model = tiny_model("dream_tiny")
    params = DecodingParams(algorithm="dream", max_tokens=16, steps=8, alg="maskgit_plus", threshold=None)
    policy = build_policy(params, model)
    assert isinstance(policy, DreamPolicy) and policy.shift_logits
    s = new_seq([248, 17, 99, 3], params.generation_slots())
    run_to_completion(model, [(s, policy)])
    assert s.nfe == 8 and not (s.canvas == TINY_SPECIAL.mask).any()


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"alg": "greedy"}, "alg"), ({"steps": 0}, "steps"), ({"top_p": 1.5}, "top_p"), ({"eps": 1.0}, "eps")],
)
def test_invalid_settings_name_the_field(changes: dict, field: str) -> None:
    base = {"steps": 4}
    with pytest.raises(ValueError, match=f"^{field}:"):
        DreamSettings(**{**base, **changes}).validate()


def test_unknown_reference_argument_is_rejected() -> None:
    from dllm_runtime.decoding.registry import policy_from_reference

    case = golden_cases("dream")["dream_entropy_t0"]
    with pytest.raises(ValueError, match="^output_history:"):
        policy_from_reference(case["reference"], {**case["kwargs"], "output_history": True}, TINY_SPECIAL)


def test_top_k_and_top_p_restrict_sampling() -> None:
    """With top_k=1 (or a tiny top_p) sampling at any temperature returns the argmax."""
    logits = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rng = RandomSource(3)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        _, tokens = sample_tokens(logits, rng, temperature=2.0, **kwargs)
        assert torch.equal(tokens, logits.argmax(-1))
    _, sampled = sample_tokens(logits, rng, temperature=2.0)
    assert not torch.equal(sampled, logits.argmax(-1))


def test_dream_canvas_is_exactly_max_tokens() -> None:
    """No block rounding for Dream: where the answer ends on the canvas depends on its length."""
    params = DecodingParams(algorithm="dream", max_tokens=40, block_length=32).validate()
    assert params.generation_slots() == 40 and params.resolved_steps() == 40


def test_settings_dream_would_ignore_are_rejected() -> None:
    params = DecodingParams(algorithm="dream", max_tokens=16, remasking="random")
    with pytest.raises(ValueError, match="^remasking: not used by algorithm='dream'"):
        build_policy(params, tiny_model("dream_tiny"))


@pytest.mark.parametrize("name", ["dream_entropy_t0", "dream_topk_margin_t0", "dream_entropy_topk5_temp1.0"])
def test_serving_params_reproduce_the_reference(name: str) -> None:
    """The server's path (DecodingParams -> build_policy, seed -> RandomSource) gives the golden answer."""
    case = golden_cases("dream")[name]
    kw = case["kwargs"]
    params = DecodingParams(algorithm="dream", max_tokens=kw["max_new_tokens"], steps=kw["steps"], alg=kw["alg"],
                            temperature=kw["temperature"], top_p=kw["top_p"], top_k=kw["top_k"],
                            alg_temp=kw["alg_temp"], seed=case["seed_before_call"]).validate()
    model = tiny_model("dream_tiny")
    seq = new_seq(case["prompt"][0], params.generation_slots(), params.seed)
    run_to_completion(model, [(seq, build_policy(params, model))])
    assert seq.canvas.tolist() == case["output"] and seq.nfe == case["nfe"]
