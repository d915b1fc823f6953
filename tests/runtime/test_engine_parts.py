"""Engine building blocks in isolation: incremental detokenizer and admission scheduler.

The detokenizer runs against the real Dream (Qwen2 byte-level BPE) tokenizer (tests/assets/tokenizers), where
an emoji really is split across tokens, and a byte-level tokenizer for hand-made byte splits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dllm_runtime.decoding.base import RandomSource, Sequence, generation_ids
from dllm_runtime.engine.config import EngineConfig
from dllm_runtime.engine.detokenizer import IncrementalDetokenizer
from dllm_runtime.engine.request import QueueFullError, RequestValidationError
from dllm_runtime.engine.scheduler import Footprint, Scheduler
from tests.helpers.byte_tokenizer import ByteTokenizer
from dllm_runtime.models.base import SpecialIds
from tests.helpers.tiny_models import TOKENIZERS

TEXT = "Grüße, 世界! 🚀🚀 naïve café — done."


@pytest.fixture(scope="module")
def qwen():
    from dllm_runtime.tokenizer import load_tokenizer

    folder = Path(TOKENIZERS) / "dream-v0-instruct-7b"
    return load_tokenizer(folder)


def stream(detok: IncrementalDetokenizer, ids: list[int], stride: int) -> list[str]:
    """Feed growing prefixes (`stride` tokens finalised per step, like a diffusion step) then flush."""
    deltas = [detok.update(ids[:n])[0] for n in range(stride, len(ids) + stride, stride)]
    deltas.append(detok.update(ids[: len(ids)], final=True)[0])
    return deltas


@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_real_bpe_stream_never_breaks_a_character(qwen, stride: int) -> None:
    ids = qwen.encode(TEXT, add_special_tokens=False)
    # precondition: the tokenizer really splits a character across tokens
    assert any("\ufffd" in qwen.decode(ids[:n]) for n in range(1, len(ids)))
    detok = IncrementalDetokenizer(qwen)
    deltas = stream(detok, ids, stride)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT == detok.text
    assert detok.token_ids == ids


def test_split_multibyte_character_is_held_back_until_complete() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    e_acute = list("é".encode())  # two bytes, two tokens
    assert detok.update([ord("a"), e_acute[0]]) == ("a", [ord("a"), e_acute[0]])
    assert detok.update([ord("a"), *e_acute]) == ("é", [e_acute[1]])
    # an invalid byte at the very end is flushed when the request ends, not lost
    assert detok.update([ord("a"), *e_acute, 0xC3], final=True)[0] == "\ufffd"


def test_possible_stop_string_prefix_is_held_back() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, stop=["END"])
    assert detok.update(tok.encode("abcE"))[0] == "abc"
    assert detok.update(tok.encode("abcEN"))[0] == ""
    assert detok.update(tok.encode("abcENx"))[0] == "ENx"  # not the stop string after all
    assert not detok.stopped
    assert detok.update(tok.encode("abcENxEN"), final=True)[0] == "EN"  # the end flushes it


def test_stop_string_cuts_text_and_counts_tokens_up_to_it() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, stop=["STOP", "xyz"])
    assert detok.update(tok.encode("hello S"))[0] == "hello "
    text, ids = detok.update(tok.encode("hello STOP and more xyz"))  # a step finalised many tokens
    assert detok.stopped
    assert text == "" and detok.text == "hello "
    assert detok.token_ids == tok.encode("hello STOP")  # usage: up to the token completing the stop
    assert detok.update(tok.encode("hello STOP and more xyz!"), final=True) == ("", [])


def test_earliest_stop_string_wins_and_may_start_in_sent_text() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, stop=["cd", "abc"])
    assert detok.update(tok.encode("xab"))[0] == "x"  # "ab" may become "abc"
    assert detok.update(tok.encode("xabcd"))[0] == ""
    assert detok.stopped and detok.text == "x"


def test_stop_string_at_start_gives_empty_text() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, stop=["\n"])
    detok.update(tok.encode("\nabc"))
    assert detok.stopped and detok.text == "" and detok.token_ids == tok.encode("\n")


def fp(rows: int = 1, canvas: int = 10, cache: int = 0) -> Footprint:
    return Footprint(rows=rows, canvas=canvas, cache_bytes=cache)


def test_generation_ids_read_each_sequences_current_canvas() -> None:
    """The engine reads every sequence's generation slots after every step through a view kept on the
    sequence; in-place commits show through it, and a canvas replaced by a new tensor is read anew."""
    special = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)
    one = Sequence(canvas=torch.tensor([[1, 2, 250, 250]]), prompt_len=2, special=special, rng=RandomSource(0))
    two = Sequence(canvas=torch.tensor([[3, 250, 250, 250]]), prompt_len=1, special=special, rng=RandomSource(0))
    assert generation_ids([one, two]) == [[250, 250], [250, 250, 250]]
    one.canvas[0, 2] = 7
    two.canvas[0, 3] = 8
    assert generation_ids([one, two]) == [[7, 250], [250, 250, 8]]
    one.canvas = torch.tensor([[1, 2, 5, 6, 250]])
    assert generation_ids([two, one]) == [[250, 250, 8], [5, 6, 250]]


def test_scheduler_is_strict_fifo_under_every_limit() -> None:
    sched: Scheduler[str] = Scheduler(EngineConfig(max_num_seqs=3, max_num_batched_tokens=100, max_model_len=100, max_cache_bytes=1000))
    sched.enqueue("a", fp(canvas=60))
    sched.enqueue("big", fp(canvas=50))  # does not fit next to "a" (110 > 100 tokens)
    sched.enqueue("small", fp(canvas=5))  # would fit, but must not overtake "big"
    assert sched.admit() == ["a"]
    assert sched.admit() == [] and sched.num_waiting == 2
    sched.release(fp(canvas=60))
    assert sched.admit() == ["big", "small"]
    assert (sched.num_running, sched.running_tokens) == (2, 55)


def test_scheduler_limits_sequences_and_cache_bytes() -> None:
    sched: Scheduler[int] = Scheduler(EngineConfig(max_num_seqs=2, max_cache_bytes=250))
    for i in range(4):
        sched.enqueue(i, fp(cache=100))
    assert sched.admit() == [0, 1]  # two sequences: both limits allow exactly two
    sched.release(fp(cache=100))
    assert sched.admit() == [2] and sched.reserved_cache_bytes == 200
    assert sched.remove_waiting(lambda i: i == 3) == [3] and sched.num_waiting == 0


def test_scheduler_refuses_what_can_never_fit_and_bounds_the_queue() -> None:
    sched: Scheduler[int] = Scheduler(EngineConfig(max_num_batched_tokens=100, max_model_len=100, max_waiting=1, max_cache_bytes=50))
    with pytest.raises(RequestValidationError) as err:
        sched.check_fits(fp(rows=2, canvas=60))  # fits alone without CFG
    assert err.value.param == "cfg_scale"
    with pytest.raises(RequestValidationError) as err:
        sched.check_fits(fp(canvas=101))
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestValidationError) as err:
        sched.check_fits(fp(cache=51))
    assert err.value.param == "cache"
    sched.enqueue(1, fp())
    with pytest.raises(QueueFullError):
        sched.enqueue(2, fp())


def test_engine_config_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0).validate()
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=100, max_model_len=200).validate()
    with pytest.raises(ValueError, match="min_forward_tokens"):
        EngineConfig(min_forward_tokens=-1).validate()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("model_name", ["llada_tiny", "dream_tiny"])
def test_batched_forward_logits_do_not_depend_on_the_batch(model_name: str, threads: int) -> None:
    """Bit-identical logits for a spec alone, in a packed mixed-length batch and in a plain batch.

    Covers the two batch-composition effects the step loop neutralises (see engine/step.py):
    padded attention keys, and MKL's small-M GEMM kernels (with `min_tokens`).
    """
    import torch

    from dllm_runtime.decoding.base import ForwardSpec, Sequence
    from dllm_runtime.engine.step import batched_forward
    from tests.runtime.golden_replay import random_spec, tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_model(model_name)
        gen = torch.Generator().manual_seed(0)

        def spec(length: int, rows: int = 1, left_pad: int = 0) -> tuple[Sequence, ForwardSpec]:
            return random_spec(model, gen, length, rows, left_pad)

        mixed = [spec(5), spec(9), spec(17, rows=2), spec(30, left_pad=3), spec(40), spec(9)]
        same = [spec(12), spec(12, rows=2), spec(12)]
        for work in (mixed, same):
            alone = [batched_forward(model, [w], min_tokens=64)[0] for w in work]
            together = batched_forward(model, work, min_tokens=64)
            for a, b in zip(alone, together):
                assert a.shape == b.shape and torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("min_tokens", [0, 64])
def test_logits_at_selects_exactly_the_full_heads_rows(min_tokens: int, threads: int) -> None:
    """`ForwardSpec.logits_at`: the head runs on a few positions; those logits equal the full head's.

    Selections of 1..n positions (the LLaDA policy's candidates) alone and mixed with rows that
    want every position; `min_tokens=0` is the conformance path, where only `MIN_HEAD_ROWS` keeps
    the small head GEMM on the same kernel as a full-canvas one.
    """
    import torch

    from dllm_runtime.decoding.base import ForwardSpec, Sequence
    from dllm_runtime.engine.step import batched_forward
    from tests.runtime.golden_replay import random_spec, tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_model("llada_tiny")
        gen = torch.Generator().manual_seed(1)

        def spec(length: int, picks: list[int] | None, rows: int = 1) -> tuple[Sequence, ForwardSpec]:
            return random_spec(model, gen, length, rows, logits_at=picks)

        work = [spec(24, [23]), spec(40, list(range(8, 16))), spec(17, None), spec(24, [0, 5], rows=2), spec(24, [])]
        full = [batched_forward(model, [(s, ForwardSpec(f.input_ids, f.positions))], min_tokens)[0] for s, f in work]
        together = batched_forward(model, work, min_tokens)
        for (_, f), whole, got in zip(work, full, together):
            want = whole if f.logits_at is None else whole[:, f.logits_at]
            alone = batched_forward(model, [(_, f)], min_tokens)[0]
            assert got.shape == want.shape == alone.shape
            assert torch.equal(got, want) and torch.equal(alone, want)
    finally:
        torch.set_num_threads(before)
