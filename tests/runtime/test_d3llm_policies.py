"""d3LLM decoders against the golden vectors (tests/golden/d3llm_golden.json).

Replayed logits (decoder in isolation) and the real tiny LLaDA / Dream models (end to end) through
the real step loop; plus the cross-check built into the set (multi-block with
`block_add_threshold = decoded_token_threshold = 1.0` == block-wise `generate`) and the early-stop
rules on hand-made logits.
"""

from __future__ import annotations

import pytest
import torch

from dllm_runtime.decoding.base import RandomSource, Sequence
from dllm_runtime.decoding.d3llm import (
    D3LLMBlockwisePolicy,
    D3LLMMultiBlockPolicy,
    D3LLMSettings,
    entropy_f64,
    llada_position_ids,
)
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine.step import run_to_completion
from dllm_runtime.models.base import DiffusionModel, select_logits
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

CASES = sorted(golden_cases("d3llm"))
MASK, EOS = TINY_SPECIAL.mask, TINY_SPECIAL.eos


def test_golden_set_is_complete() -> None:
    assert len(CASES) == 7


@pytest.mark.parametrize("name", CASES)
def test_replayed_logits_reproduce_reference(name: str) -> None:
    case = golden_cases("d3llm")[name]
    model = ReplayModel(case, golden_tensors("d3llm"), shift=case["model"] == "dream_tiny")
    seqs, _ = run_case(case, model)
    assert model.calls == len(case["trace"])
    assert output_of(seqs) == case["output"]
    (seq,) = seqs
    assert seq.nfe == len(case["trace"])
    # the reference's counter also counts a final iteration that stops in the early-stop check
    assert seq.state.get("reference_nfe", seq.nfe) == case["nfe"]


@pytest.mark.parametrize("name", CASES)
def test_tiny_model_end_to_end(name: str) -> None:
    case = golden_cases("d3llm")[name]
    seqs, _ = run_case(case, tiny_model(case["model"]))
    assert output_of(seqs) == case["output"]
    assert seqs[0].state.get("reference_nfe", seqs[0].nfe) == case["nfe"]


def test_sequential_multi_block_equals_blockwise() -> None:
    cases = golden_cases("d3llm")
    seq_mb, _ = run_case(cases["d3llm_llada_multiblock_sequential_ent0.5_t0"], tiny_model("llada_tiny"))
    seq_bw, _ = run_case(cases["d3llm_llada_blockwise_entropy0.5_t0"], tiny_model("llada_tiny"))
    assert output_of(seq_mb) == output_of(seq_bw)
    assert seq_mb[0].nfe == seq_bw[0].nfe == 15


def test_early_stop_without_eos_changes_nothing() -> None:
    cases = golden_cases("d3llm")
    assert cases["d3llm_llada_multiblock_ent0.5_earlystop_t0"]["output"] == cases["d3llm_llada_multiblock_ent0.5_t0"]["output"]


# ------------------------------------------------------------------ scripted logits (rules in isolation)
class ScriptedModel(DiffusionModel):
    """Logits from a function of the canvas: lets a test decide what each forward 'predicts'."""

    def __init__(self, fn, vocab: int = 256) -> None:
        torch.nn.Module.__init__(self)
        self.fn = fn
        self.special_ids = TINY_SPECIAL
        self.shift_logits = False
        self.num_layers = 1
        self.vocab_size = vocab
        self.forwards = 0

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        return llada_position_ids(valid)

    def forward(self, input_ids, positions, attention=None, logits_index=None):  # type: ignore[override]
        self.forwards += 1
        return select_logits(self.fn(input_ids), logits_index)


def _peaked(ids: torch.Tensor, tokens: dict[int, int], vocab: int = 256) -> torch.Tensor:
    """Confident (near-zero entropy) predictions at `tokens` positions, flat logits elsewhere."""
    logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
    for pos, tok in tokens.items():
        logits[:, pos, tok] = 40.0
    return logits


def _seq(prompt_len: int, gen: int) -> Sequence:
    return new_seq([248] + [7] * (prompt_len - 1), gen)


def _decode_token_then_eos(p: int, gen: int, early_stop: bool) -> tuple[Sequence, ScriptedModel]:
    """Multi-block LLaDA decoding where every forward is sure of `20, EOS` in the first two slots."""
    model = ScriptedModel(lambda ids: _peaked(ids, {p: 20, p + 1: EOS}))
    settings = D3LLMSettings(threshold=0.5, block_length=8, early_stop=early_stop)
    policy = D3LLMMultiBlockPolicy(settings, "llada", llada_position_ids)
    seq = _seq(p, gen)
    run_to_completion(model, [(seq, policy)])
    return seq, model


def test_early_stop_fills_after_first_eos_and_stops() -> None:
    """An EOS decoded in the first forward: the next iteration fills the tail and ends without a forward."""
    p, gen = 4, 16
    seq, model = _decode_token_then_eos(p, gen, early_stop=True)
    assert seq.canvas[0, p:].tolist() == [20] + [EOS] * (gen - 1)
    assert model.forwards == seq.nfe == 1
    assert seq.state["reference_nfe"] == 2


def test_without_early_stop_the_tail_is_decoded() -> None:
    seq, _ = _decode_token_then_eos(4, 16, early_stop=False)
    assert not (seq.canvas == MASK).any()
    assert seq.nfe > 1  # flat logits elsewhere: one forced token per forward


def test_forced_progress_commits_one_token_when_nothing_passes() -> None:
    """Flat logits (entropy ln V > threshold): LLaDA rank 0 / Dream forced progress, one token per forward."""
    p, gen = 4, 8
    for variant in ("llada", "dream"):
        model = ScriptedModel(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 256))
        model.shift_logits = variant == "dream"
        policy = D3LLMMultiBlockPolicy(D3LLMSettings(threshold=0.5, block_length=8), variant, llada_position_ids)
        seq = _seq(p, gen)
        run_to_completion(model, [(seq, policy)])
        assert seq.nfe == gen and not (seq.canvas == MASK).any(), variant


def test_threshold_comparison_llada_le_dream_lt() -> None:
    """An entropy exactly at the threshold passes the LLaDA rule (<=) and fails the Dream rule (<)."""
    p, gen = 2, 4
    logits = torch.zeros(1, p + gen, 256)
    logits[:, :, 5] = 8.0  # every slot equally confident: all entropies equal
    probs = torch.softmax(logits[0, 0], -1)
    at_threshold = {
        "llada": float(entropy_f64(logits)[0, 0]),  # float64 softmax, +1e-12
        "dream": float(-(probs * torch.log(probs + 1e-8)).sum()),  # logits' dtype, +1e-8
    }
    for variant, expected in (("llada", gen), ("dream", 1)):
        settings = D3LLMSettings(threshold=at_threshold[variant], block_length=gen, steps=gen)
        policy = D3LLMBlockwisePolicy(settings, variant, llada_position_ids)
        seq = _seq(p, gen)
        policy.init(seq)
        spec = policy.plan(seq)
        assert spec is not None and spec.logits_at is not None
        policy.commit(seq, logits[:, spec.logits_at].clone())
        assert int((seq.canvas[0, p:] != MASK).sum()) == expected, variant


def test_build_policy_serves_both_variants() -> None:
    for name, variant in (("llada_tiny", "llada"), ("dream_tiny", "dream")):
        model = tiny_model(name)
        params = DecodingParams(algorithm="d3llm", max_tokens=16, block_length=8, threshold=0.5)
        policy = build_policy(params, model)
        assert isinstance(policy, D3LLMMultiBlockPolicy) and policy.variant == variant
        seq = _seq(4, params.generation_slots())
        run_to_completion(model, [(seq, policy)])
        assert not (seq.canvas == MASK).any()
        assert 1 <= seq.nfe <= 16
    cached = build_policy(params.replace(cache="prefix", cache_delay_iter=1, cache_refresh_interval=4), model)
    assert (cached.settings.cache_delay_iter, cached.settings.refresh_interval) == (1, 4)
    assert build_policy(params.replace(cache_delay_iter=1), model).settings.cache_delay_iter is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"threshold": 0}, "threshold"), ({"block_add_threshold": 1.5}, "block_add_threshold"),
     ({"remasking": "best"}, "remasking"), ({"block_length": 0}, "block_length")],
)
def test_invalid_settings_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        D3LLMSettings(**changes).validate()


def test_generation_length_must_split_into_blocks() -> None:
    policy = D3LLMMultiBlockPolicy(D3LLMSettings(block_length=8), "llada", llada_position_ids)
    with pytest.raises(ValueError, match="^block_length:"):
        policy.init(_seq(4, 12))


def test_mixed_policies_in_one_batch_match_running_alone() -> None:
    """The step loop batches d3LLM (both decoders) with Dream's sampler and differently long prompts
    into shared forwards; each request still gets exactly what it gets alone (same tokens, same NFE)."""
    model = tiny_model("llada_tiny")

    def requests() -> list[tuple[Sequence, object]]:
        multi = D3LLMMultiBlockPolicy(D3LLMSettings(threshold=0.5, block_length=8, early_stop=True), "llada",
                                      model.position_ids)
        blockwise = D3LLMBlockwisePolicy(D3LLMSettings(threshold=0.5, block_length=8), "llada", model.position_ids)
        dream = build_policy(DecodingParams(algorithm="dream", max_tokens=16, steps=8, alg="entropy"), model)
        return [(_seq(8, 16), multi), (_seq(3, 24), blockwise), (_seq(5, 16), dream)]

    alone = requests()
    for seq, policy in alone:
        run_to_completion(model, [(seq, policy)])
    together = requests()
    run_to_completion(model, together)
    for (a, _), (b, _) in zip(alone, together):
        assert torch.equal(a.canvas, b.canvas)
        assert a.nfe == b.nfe


@pytest.mark.parametrize(
    ("model_name", "changes", "field"),
    [("llada_tiny", {"top_p": 0.9}, "top_p"), ("llada_tiny", {"factor": 1.0}, "factor"),
     ("dream_tiny", {"remasking": "random"}, "remasking")],
)
def test_settings_d3llm_would_ignore_are_rejected(model_name: str, changes: dict, field: str) -> None:
    params = DecodingParams(algorithm="d3llm", max_tokens=16, block_length=8, threshold=0.5, **changes)
    with pytest.raises(ValueError, match=f"^{field}: not used by algorithm='d3llm'"):
        build_policy(params, tiny_model(model_name))


class RecordingRandomSource(RandomSource):
    """Records every draw (function, shape, dtype) while drawing from the real generator."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.calls: list[tuple[str, tuple[int, ...], torch.dtype | None]] = []

    def rand(self, shape, dtype, device):  # type: ignore[override]
        self.calls.append(("rand", tuple(shape), dtype))
        return super().rand(shape, dtype, device)

    def multinomial(self, probs, num_samples, replacement=False):  # type: ignore[override]
        self.calls.append(("multinomial", (*probs.shape[:-1], num_samples), None))
        return super().multinomial(probs, num_samples, replacement)


@pytest.mark.parametrize("variant", ["llada", "dream"])
def test_sampling_draws_follow_the_reference_order(variant: str) -> None:
    """ALGORITHMS.md §1.4, RNG at T > 0: LLaDA one float64 Gumbel `rand (1, L, V)` per forward (then the
    float32 `rand (1, L)` of random remasking); Dream one `multinomial (L, 1)` per forward."""
    model = tiny_model("llada_tiny" if variant == "llada" else "dream_tiny")
    remasking = "random" if variant == "llada" else "low_confidence"
    settings = D3LLMSettings(threshold=0.5, block_length=8, temperature=0.7, remasking=remasking)
    policy = D3LLMMultiBlockPolicy(settings, variant, model.position_ids)
    seq = _seq(4, 16)
    seq.rng = RecordingRandomSource(1)
    run_to_completion(model, [(seq, policy)])
    length, vocab = seq.length, model.vocab_size
    per_forward = ([("rand", (1, length, vocab), torch.float64), ("rand", (1, length), torch.float32)]
                   if variant == "llada" else [("multinomial", (length, 1), None)])
    assert seq.rng.calls == per_forward * seq.nfe
    assert not (seq.canvas == MASK).any()


@pytest.mark.parametrize(
    "name", ["d3llm_dream_multiblock_ent0.4_t0", "d3llm_dream_multiblock_ent0.5_earlystop_t0",
             "d3llm_llada_multiblock_ent0.5_t0"],
)
def test_serving_params_reproduce_the_reference(name: str) -> None:
    """The server's path (DecodingParams -> build_policy) gives the golden multi-block answer."""
    case = golden_cases("d3llm")[name]
    kw = case["kwargs"]
    params = DecodingParams(algorithm="d3llm", max_tokens=kw["max_new_tokens"], block_length=kw["block_size"],
                            threshold=kw["threshold"], block_add_threshold=kw["block_add_threshold"],
                            decoded_token_threshold=kw["decoded_token_threshold"],
                            early_stop=kw.get("early_stop", False)).validate()
    model = tiny_model(case["model"])
    seq = new_seq(case["prompt"][0], params.generation_slots())
    run_to_completion(model, [(seq, build_policy(params, model))])
    assert seq.canvas.tolist() == case["output"]
    assert seq.state["reference_nfe"] == case["nfe"]


@pytest.mark.parametrize(("variant", "temperature"), [("llada", 0.0), ("llada", 0.7), ("dream", 0.0), ("dream", 0.7)])
def test_head_runs_only_on_the_rows_that_predict_eligible_slots(variant: str, temperature: float) -> None:
    """Multi-block asks for the rows predicting its eligible slots (p-1 under Dream's shift), except
    Dream at T > 0, which samples every position; a full head sliced to those rows gives the same
    tokens as the step loop's selective head."""
    model = tiny_model("llada_tiny" if variant == "llada" else "dream_tiny")
    policy = D3LLMMultiBlockPolicy(D3LLMSettings(threshold=0.5, block_length=8, temperature=temperature),
                                   variant, model.position_ids)
    by_hand = _seq(4, 16)
    by_hand.rng = RandomSource(3)
    policy.init(by_hand)
    shift = int(variant == "dream")
    while (spec := policy.plan(by_hand)) is not None:
        eligible = by_hand.state["multi_block"].eligible[0].nonzero().squeeze(1)
        with torch.no_grad():
            logits = model(spec.input_ids, spec.positions)
        if variant == "dream" and temperature > 0:
            assert spec.logits_at is None
        else:
            assert spec.logits_at is not None
            assert spec.logits_at.nonzero().squeeze(1).tolist() == (eligible - shift).tolist()
            logits = logits[:, spec.logits_at]
        policy.commit(by_hand, logits)
    stepped = _seq(4, 16)
    stepped.rng = RandomSource(3)
    run_to_completion(model, [(stepped, policy)])
    assert torch.equal(by_hand.canvas, stepped.canvas)
    assert not (stepped.canvas == MASK).any()


@pytest.mark.parametrize("variant", ["llada", "dream"])
def test_blockwise_commits_block_by_block(variant: str) -> None:
    """Block-wise decoding never commits past the current block, and a tiny threshold leaves only the
    always-taken rank 0: one token per forward (NFE = generation length)."""
    model = tiny_model("llada_tiny" if variant == "llada" else "dream_tiny")
    committed: list[list[int]] = []

    class Recording(D3LLMBlockwisePolicy):
        def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
            before = seq.canvas == MASK
            super().commit(seq, logits)
            committed.append((before & (seq.canvas != MASK))[0].nonzero().flatten().tolist())

    p, gen, bl = 4, 16, 8
    policy = Recording(D3LLMSettings(threshold=1e-9, block_length=bl, steps=gen), variant, model.position_ids)
    seq = _seq(p, gen)
    run_to_completion(model, [(seq, policy)])
    assert seq.nfe == gen and all(len(c) == 1 for c in committed)
    blocks = [(c[0] - p) // bl for c in committed]
    assert blocks == sorted(blocks) == [0] * bl + [1] * bl


class LeftmostModel(DiffusionModel):
    """Predicts, with near-zero entropy, token `10 + position` for the first masked slot of each
    window and flat logits elsewhere: every d3LLM forward commits exactly that one slot, and a
    window whose logits land on the wrong rows shows up as a wrong token."""

    def __init__(self, shift: bool, vocab: int = 256) -> None:
        torch.nn.Module.__init__(self)
        self.special_ids = TINY_SPECIAL
        self.shift_logits = shift
        self.num_layers = 1
        self.vocab_size = vocab
        self.proj = torch.nn.Linear(1, 1)  # parameters: the engine reads device and dtype from them

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        return llada_position_ids(valid)

    def forward(self, input_ids, positions, attention=None, logits_index=None):  # type: ignore[override]
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row in range(input_ids.shape[0]):
            masked = (input_ids[row] == MASK).nonzero()
            if masked.numel():
                slot = int(masked[0, 0])
                logits[row, slot - int(self.shift_logits), 10 + int(positions[row, slot])] = 40.0
        if attention is not None:  # the step loop's cache bookkeeping runs inside attention
            q = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 2)
            attention.attend(0, q, q, q)
        return select_logits(logits, logits_index)


def _decode_recording_windows(
    settings: D3LLMSettings, variant: str, p: int = 4, gen: int = 16
) -> tuple[list[int], list[tuple[int, bool, bool]]]:
    """Decode with `LeftmostModel`: the answer and each forward's `(offset, use_cache, store_cache)`."""
    windows: list[tuple[int, bool, bool]] = []

    class Recording(D3LLMMultiBlockPolicy):
        def plan(self, seq: Sequence):
            spec = super().plan(seq)
            if spec is not None:
                windows.append((spec.offset, spec.use_cache, spec.store_cache))
            return spec

    seq = _seq(p, gen)
    run_to_completion(LeftmostModel(shift=variant == "dream"), [(seq, Recording(settings, variant, llada_position_ids))])
    assert seq.nfe == gen  # one committed slot per forward
    return seq.canvas[0, p:].tolist(), windows


@pytest.mark.parametrize("variant", ["llada", "dream"])
def test_delayed_cache_follows_d3llm_schedule(variant: str) -> None:
    """d3LLM's delayed cache (`cache_delay_iter=2`), one committed slot per forward: the prompt is
    cached 2 forwards after the start, block 1 2 forwards after it is decoded, full refresh forwards
    while it stabilises, and cached forwards run from the cache end (one row earlier for Dream's
    shifted logits). The answer equals the uncached run's."""
    p, gen, shift = 4, 16, int(variant == "dream")
    uncached, _ = _decode_recording_windows(D3LLMSettings(threshold=0.5, block_length=8), variant, p, gen)
    cached, windows = _decode_recording_windows(
        D3LLMSettings(threshold=0.5, block_length=8, cache_delay_iter=2), variant, p, gen
    )
    assert uncached == cached == [10 + p + i for i in range(gen)]
    full, stored = (0, False, False), (0, False, True)
    assert windows == (
        [full, full, stored]  # forwards 1-2: the prompt stabilises; 3: it enters the cache
        + [(p - shift, True, False)] * 5  # 4-8: read the cached prompt while block 1 decodes
        + [stored, stored]  # 9-10: block 1 decoded, stabilising: full forwards refresh the prompt's K/V
        + [(p - shift, True, True)]  # 11: block 1 joins the cache
        + [(p + 8 - shift, True, False)] * 5  # 12-16: block 2 reads prompt + block 1 from the cache
    )


def test_delayed_cache_periodic_refresh() -> None:
    """`cache_delay_iter=0` caches a block as soon as it is decoded; `refresh_interval=3` makes every
    third forward a full one that rewrites the cached prefix, unless that forward grows the cache."""
    settings = D3LLMSettings(threshold=0.5, block_length=8, cache_delay_iter=0, refresh_interval=3)
    answer, windows = _decode_recording_windows(settings, "llada")
    assert answer == [10 + 4 + i for i in range(16)]
    refresh, on_prompt, on_block1 = (0, False, True), (4, True, False), (12, True, False)
    assert windows == [
        refresh,  # 1: the prompt joins the cache at once (a storing full forward: no cache yet)
        on_prompt, refresh, on_prompt, on_prompt, refresh, on_prompt, on_prompt,  # 2-8: refresh at 3, 6
        (4, True, True),  # 9: block 1 decoded at 8 joins the cache (growing wins over the refresh)
        on_block1, on_block1, refresh, on_block1, on_block1, refresh, on_block1,  # 10-16: refresh at 12, 15
    ]
