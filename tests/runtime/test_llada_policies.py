"""LLaDA / Fast-dLLM policies: primitives, serving settings, the serving path against the golden
outputs, and mixed batches through the one step loop.

The model is the golden tiny LLaDA (`tests/golden/llada_tiny.*`, fp32), so every expected token here
is the unmodified reference's output, never a value computed by the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dllm_runtime.decoding.base import RandomSource
from dllm_runtime.decoding.fast_dllm import FastDLLMConfig, FastDLLMPolicy
from dllm_runtime.decoding.llada import LLaDAConfig, LLaDAPolicy
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.primitives import (
    factor_count,
    gumbel,
    quota,
    transfer_fixed_or_threshold,
    truncate,
)
from dllm_runtime.decoding.registry import (
    build_policy,
    policy_from_reference,
    reference_key,
)
from dllm_runtime.engine.step import run_to_completion
from tests.runtime.golden_replay import TINY_SPECIAL, golden_cases, new_seq, one_thread, tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [248, 17, 99, 3, 42, 120, 7, 230]


class CountingRandom(RandomSource):
    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []

    def rand(self, shape, dtype, device):  # type: ignore[no-untyped-def]
        self.calls.append((tuple(shape), dtype))
        return super().rand(shape, dtype, device)


# ---------------------------------------------------------------------------- primitives
def test_quota_gives_extras_to_the_first_steps() -> None:
    assert quota(32, 12) == [3] * 8 + [2] * 4
    assert quota(5, 8) == [1] * 5 + [0] * 3
    assert sum(quota(37, 5)) == 37
    with pytest.raises(ValueError, match="steps"):
        quota(4, 0)


@pytest.mark.parametrize(
    "confidences, factor, expected",
    [
        ([0.99, 0.1, 0.05, 0.01], 1.0, 1),  # first failure at rank 1: only rank 0
        ([0.99, 0.9, 0.8, 0.1, 0.05], 1.0, 3),  # 0.9 >= 2/3, 0.8 >= 3/4, 0.1 < 4/5: three
        ([0.99, 0.9, 0.1], 1.0, 3),  # a failure at the LAST rank still takes all (upstream quirk)
        ([0.99, 0.99], 1.0, 2),  # nobody fails: all
        ([0.2], 1.0, 1),  # a single mask is always committed
        ([0.99, 0.6, 0.1, 0.05], 2.0, 2),  # larger factor, lower bar: 0.6 >= 1 - 2/3, 0.1 < 1 - 2/4
    ],
)
def test_factor_rule(confidences: list[float], factor: float, expected: int) -> None:
    assert factor_count(torch.tensor(confidences, dtype=torch.float64), factor) == expected


def test_gumbel_at_zero_temperature_is_the_same_tensor_and_draws_nothing() -> None:
    rng = CountingRandom()
    logits = torch.randn(1, 5, 7)
    assert gumbel(logits, 0.0, rng) is logits and rng.calls == []
    noisy = gumbel(logits, 0.7, rng)
    assert noisy.dtype == torch.float64 and rng.calls == [((1, 5, 7), torch.float64)]


def test_threshold_transfer_commits_at_least_one_masked_token() -> None:
    logits = torch.zeros(1, 4, 10)  # uniform: every confidence is 0.1 < threshold
    x = torch.tensor([[5, TINY_SPECIAL.mask, TINY_SPECIAL.mask, 6]])
    mask = x == TINY_SPECIAL.mask
    x0, transfer = transfer_fixed_or_threshold(logits, 0.0, "low_confidence", mask, x, None, 0.9, RandomSource(0))
    assert int(transfer.sum()) == 1 and bool((transfer & ~mask).sum() == 0)
    _, none = transfer_fixed_or_threshold(
        logits, 0.0, "low_confidence", torch.zeros_like(mask), x, None, 0.9, RandomSource(0)
    )
    assert int(none.sum()) == 0


def test_truncate_keeps_top_k_and_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(truncate(logits, 2, None)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(truncate(logits, None, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(truncate(logits, None, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(truncate(logits, None, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(truncate(logits, None, None), logits)


def test_top_k_one_at_any_temperature_is_greedy() -> None:
    """Sampling from the single most likely token: the T = 0 reference output, via the serving path."""
    case = golden_cases("llada")["fastdllm_threshold0.9_t0"]
    params = DecodingParams(
        max_tokens=32, block_length=8, steps=32, threshold=0.9, temperature=1.3, top_k=1, seed=5
    ).validate()
    seq = new_seq(case["prompt"][0], params.generation_slots(), seed=params.seed)
    run_to_completion(tiny_model("llada_tiny"), [(seq, build_policy(params, tiny_model("llada_tiny")))])
    assert seq.canvas[0].tolist() == case["output"][0] and seq.nfe == case["nfe"]


# ---------------------------------------------------------------------------- DecodingParams
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(algorithm="ar"), "algorithm"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(block_length=0), "block_length"),
        (dict(steps=0), "steps"),
        (dict(max_tokens=64, block_length=32, steps=3), "steps"),  # 2 blocks do not divide 3 steps
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(remasking="lowest"), "remasking"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(factor=0), "factor"),
        (dict(cache="full"), "cache"),
        (dict(algorithm="llada", cache="prefix"), "cache"),
        (dict(algorithm="d3llm", cache="dual"), "cache"),
        (dict(algorithm="d3llm", cache="prefix", cache_delay_iter=-1), "cache_delay_iter"),
        (dict(algorithm="d3llm", cache="prefix", cache_refresh_interval=0), "cache_refresh_interval"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(algorithm="fast_dllm", cfg_scale=1.0), "cfg_scale"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(alg="greedy"), "alg"),
    ],
)
def test_invalid_params_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as err:
        DecodingParams(**changes).validate()
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_defaults_are_valid_fast_dllm_threshold() -> None:
    params = DecodingParams().validate()
    assert (params.algorithm, params.resolved_threshold(), params.block_length, params.cache) == ("fast_dllm", 0.9, 32, "none")


@pytest.mark.parametrize(
    "changes, resolved",
    [
        (dict(), 0.9),  # Fast-dLLM's confidence threshold
        (dict(steps=64), None),  # explicit steps without a threshold: the fixed quota schedule
        (dict(factor=1.0), None),
        (dict(threshold=0.7), 0.7),
        (dict(algorithm="d3llm"), 0.5),  # an entropy bound in nats, not Fast-dLLM's 0.9
        (dict(algorithm="d3llm", threshold=2.0), 2.0),  # entropies may exceed 1
        (dict(algorithm="llada"), None),
    ],
)
def test_threshold_resolves_per_algorithm(changes: dict[str, Any], resolved: float | None) -> None:
    assert DecodingParams(**changes).validate().resolved_threshold() == resolved


def test_d3llm_serving_default_uses_the_entropy_threshold() -> None:
    policy = build_policy(DecodingParams(algorithm="d3llm", max_tokens=16, block_length=8), tiny_model("llada_tiny"))
    assert policy.settings.threshold == 0.5


@pytest.mark.parametrize(
    "max_tokens, block, slots, eff_block",
    [(256, 32, 256, 32), (40, 32, 64, 32), (16, 32, 16, 16), (33, 8, 40, 8), (1, 32, 1, 1)],
)
def test_generation_slots_round_up_to_whole_blocks(max_tokens: int, block: int, slots: int, eff_block: int) -> None:
    params = DecodingParams(max_tokens=max_tokens, block_length=block).validate()
    assert params.generation_slots() == slots
    assert params.effective_block_length() == eff_block
    assert params.resolved_steps() == slots  # default: one step per slot


def test_from_dict_overlays_and_rejects_unknown_keys() -> None:
    base = DecodingParams(steps=64)
    params = DecodingParams.from_dict({"threshold": 0.7, "steps": None}, base)
    assert params.threshold == 0.7 and params.steps == 64
    with pytest.raises(ValueError, match="^thresh: unknown decoding parameter"):
        DecodingParams.from_dict({"thresh": 0.7})


def test_build_policy_picks_the_algorithm_and_rejects_shifted_models(tiny_dream_dir: Path) -> None:
    model = tiny_model("llada_tiny")
    assert isinstance(build_policy(DecodingParams(), model), FastDLLMPolicy)
    assert isinstance(build_policy(DecodingParams(algorithm="llada"), model), LLaDAPolicy)
    with pytest.raises(ValueError, match="^steps:"):
        build_policy(DecodingParams(max_tokens=64, steps=3), model)
    from dllm_runtime.models import load_model

    with pytest.raises(ValueError, match="^algorithm:.*dream"):
        build_policy(DecodingParams(algorithm="llada"), load_model(tiny_dream_dir))


def test_reference_names_and_unknown_arguments() -> None:
    assert reference_key("NVlabs/Fast-dLLM v1/llada/generate.py::generate (a9b81e4)") == (
        "NVlabs/Fast-dLLM v1/llada/generate.py::generate"
    )
    with pytest.raises(KeyError, match="no decoder reproduces"):
        policy_from_reference("someone/else gen.py::generate (abc)", {}, TINY_SPECIAL)
    with pytest.raises(ValueError, match="^top_p:"):
        policy_from_reference("ML-GSAI/LLaDA generate.py::generate (HEAD b7e6c35)", {"top_p": 0.9}, TINY_SPECIAL)
    decoder = policy_from_reference("ML-GSAI/LLaDA generate.py::generate (HEAD b7e6c35)", {"mask_id": 7}, TINY_SPECIAL)
    assert decoder.special.mask == 7 and decoder.gen_length == 128  # upstream default


# ---------------------------------------------------------------------------- serving path == reference
SERVING_EQUIVALENTS = {
    "llada_lowconf_semiar_t0": dict(algorithm="llada", steps=16, block_length=8),
    "llada_lowconf_uneven_steps_t0": dict(algorithm="llada", steps=12, block_length=32),
    "llada_lowconf_semiar_temp0.8": dict(algorithm="llada", steps=16, block_length=8, temperature=0.8, seed=1234),
    "llada_random_remask_t0": dict(algorithm="llada", steps=16, block_length=8, remasking="random", seed=7),
    "llada_cfg1.5_t0": dict(algorithm="llada", steps=16, block_length=8, cfg_scale=1.5),
    "llada_eos_flags_t0": dict(
        algorithm="llada", steps=32, block_length=32, logits_eos_inf=True, confidence_eos_eot_inf=True
    ),
    "fastdllm_fixedsteps_t0": dict(steps=16, block_length=8, threshold=None),
    "fastdllm_threshold0.9_t0": dict(steps=32, block_length=8, threshold=0.9),
    "fastdllm_factor1.0_t0": dict(steps=32, block_length=8, factor=1.0),
    "fastdllm_prefixcache_threshold0.9_t0": dict(steps=32, block_length=8, threshold=0.9, cache="prefix"),
    "fastdllm_dualcache_threshold0.9_t0": dict(steps=32, block_length=8, threshold=0.9, cache="dual"),
    "fastdllm_dualcache_fixedsteps_t0": dict(steps=16, block_length=8, threshold=None, cache="dual"),
    "fastdllm_threshold0.9_temp0.7": dict(steps=32, block_length=8, threshold=0.9, temperature=0.7, seed=99),
}


@pytest.mark.parametrize("name", sorted(SERVING_EQUIVALENTS))
def test_serving_params_reproduce_the_reference(name: str) -> None:
    """`build_policy(DecodingParams(...))`, as the engine calls it, gives the reference's tokens and NFE."""
    case = golden_cases("llada")[name]
    params = DecodingParams(max_tokens=32, **SERVING_EQUIVALENTS[name]).validate()
    seq = new_seq(case["prompt"][0], params.generation_slots(), seed=params.seed)
    run_to_completion(tiny_model("llada_tiny"), [(seq, build_policy(params, tiny_model("llada_tiny")))])
    assert seq.canvas[0].tolist() == case["output"][0]
    assert seq.nfe == case["nfe"]


def test_mixed_policies_and_caches_share_batched_forwards() -> None:
    """LLaDA, Fast-dLLM, prefix and dual cache and a longer prompt in ONE batch, each as if alone."""
    names = ["llada_lowconf_semiar_t0", "fastdllm_prefixcache_threshold0.9_t0", "fastdllm_dualcache_threshold0.9_t0",
             "fastdllm_threshold0.9_t0"]  # fmt: skip
    batch = []
    for name in names:
        case = golden_cases("llada")[name]
        decoder = policy_from_reference(case["reference"], case["kwargs"], TINY_SPECIAL)
        batch.append((new_seq(case["prompt"][0], decoder.gen_length), decoder.policy))
    longer = PROMPT + [11, 12, 13, 14, 15]
    solo_policy = FastDLLMPolicy(FastDLLMConfig(steps=16, block_length=8, threshold=0.9, cache="prefix"))
    solo = new_seq(longer, 16)
    run_to_completion(tiny_model("llada_tiny"), [(solo, solo_policy)])
    batch.append((new_seq(longer, 16), solo_policy))

    run_to_completion(tiny_model("llada_tiny"), batch)
    for name, (seq, _) in zip(names, batch):
        assert seq.canvas[0].tolist() == golden_cases("llada")[name]["output"][0], name
        assert seq.nfe == golden_cases("llada")[name]["nfe"], name
    assert torch.equal(batch[-1][0].canvas, solo.canvas) and batch[-1][0].nfe == solo.nfe


# ---------------------------------------------------------------------------- schedule behaviour
def test_llada_always_runs_steps_forwards_fast_dllm_stops_at_complete_blocks() -> None:
    llada, fast = new_seq(PROMPT, 8), new_seq(PROMPT, 8)
    run_to_completion(tiny_model("llada_tiny"), [(llada, LLaDAPolicy(LLaDAConfig(steps=16, block_length=8)))])
    run_to_completion(tiny_model("llada_tiny"), [(fast, FastDLLMPolicy(FastDLLMConfig(steps=16, block_length=8)))])
    assert llada.nfe == 16  # quota [1]*8 + [0]*8: trailing zero-quota steps still run (reference)
    assert fast.nfe == 8  # Fast-dLLM breaks as soon as the block is complete
    assert torch.equal(llada.canvas, fast.canvas)  # same picks: one most-confident token per step
    assert not bool((llada.canvas == TINY_SPECIAL.mask).any())


def test_dual_cache_is_bounded_by_steps_per_block() -> None:
    """spb = 1: only each block's full forward runs; unfinished masks may stay (as upstream)."""
    seq = new_seq(PROMPT, 32)
    policy = FastDLLMPolicy(FastDLLMConfig(steps=4, block_length=8, threshold=0.99, cache="dual"))
    run_to_completion(tiny_model("llada_tiny"), [(seq, policy)])
    assert seq.nfe == 4
    assert bool((seq.canvas[0, len(PROMPT) :] == TINY_SPECIAL.mask).any())


def test_cfg_plans_a_conditional_and_an_unconditional_row() -> None:
    seq = new_seq(PROMPT, 8)
    policy = LLaDAPolicy(LLaDAConfig(steps=8, block_length=8, cfg_scale=2.0))
    policy.init(seq)
    spec = policy.plan(seq)
    assert spec is not None and spec.input_ids.shape == (2, 16)
    assert torch.equal(spec.input_ids[0], seq.canvas[0])
    assert spec.input_ids[1].tolist() == [TINY_SPECIAL.mask] * 16  # prompt masked, generation already masked


def test_prefix_cache_plans_suffix_windows_after_the_block_start() -> None:
    seq = new_seq(PROMPT, 16)
    policy = FastDLLMPolicy(FastDLLMConfig(steps=16, block_length=8, threshold=None, cache="prefix"))
    windows = []
    policy.init(seq)
    while (spec := policy.plan(seq)) is not None:
        windows.append((spec.offset, spec.input_ids.shape[1], spec.use_cache, spec.store_cache))
        assert spec.logits_at is not None  # logits of the window's candidate slots only
        policy.commit(seq, torch.zeros(spec.input_ids.shape[0], int(spec.logits_at.sum()), 256))
        seq.nfe += 1
    # block 0 starts at 8, block 1 at 16; each block: one full storing forward, then suffix windows
    assert windows[0] == (0, 24, False, True) and windows[1] == (8, 16, True, False)
    assert (0, 24, False, True) in windows[1:] and (16, 8, True, False) in windows


def test_policy_rejects_a_canvas_that_does_not_split_into_blocks() -> None:
    with pytest.raises(ValueError, match="^block_length"):
        LLaDAPolicy(LLaDAConfig(steps=4, block_length=8)).init(new_seq(PROMPT, 12))
    with pytest.raises(ValueError, match="^steps"):
        FastDLLMPolicy(FastDLLMConfig(steps=3, block_length=8)).init(new_seq(PROMPT, 16))
