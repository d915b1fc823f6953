"""AsyncEngine: continuous batching, determinism, stopping, streaming, cancellation, limits.

Real parts throughout: the golden tiny LLaDA / Dream models (fp32, CPU), the real decoding policies
through `registry.build_policy`, the real step loop and worker thread, a byte-level tokenizer (the
golden models have a 256-token vocabulary) and, for the responsiveness test, the tiny Hugging Face
LLaDA folder with its real tokenizer. Test-only pieces are named as such: a policy wrapper that
raises (failure isolation) and a model wrapper that boosts the EOS logit (early stop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from dllm_runtime.decoding.base import DecodingPolicy, ForwardSpec, Sequence
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine import (
    AsyncEngine,
    EngineConfig,
    EngineShutdownError,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RequestStats,
    RequestValidationError,
    StepStats,
)
from dllm_runtime.models.base import DiffusionModel, select_logits
from tests.helpers.byte_tokenizer import ByteTokenizer
from tests.runtime.golden_replay import one_thread, tiny_model  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def llada() -> DiffusionModel:
    return tiny_model("llada_tiny")


@pytest.fixture(scope="module")
def dream() -> DiffusionModel:
    return tiny_model("dream_tiny")


class Recorder:
    """EngineObserver collecting every callback (called from the worker thread)."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.finished: list[RequestStats] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats: RequestStats) -> None:
        self.finished.append(stats)


class Result:
    def __init__(self, outs: list[GenerationOutput]) -> None:
        self.outs = outs
        self.final = outs[-1]
        self.text = "".join(o.text_delta for o in outs)
        self.ids = [i for o in outs for i in o.token_ids_delta]

    def key(self) -> tuple[Any, ...]:
        f = self.final
        return (self.ids, self.text, f.finish_reason, f.completion_tokens, f.nfe)


async def collect(engine: AsyncEngine, request: GenerationRequest) -> Result:
    outs = [out async for out in engine.generate(request)]
    assert outs and outs[-1].finished and all(not o.finished for o in outs[:-1])
    return Result(outs)


def req(rid: str, prompt: str, **params: Any) -> GenerationRequest:
    stop = params.pop("stop", [])
    return GenerationRequest(rid, TOK.encode(prompt), DecodingParams(**params), stop=stop)


def started(model: DiffusionModel, **kw: Any) -> tuple[AsyncEngine, Recorder]:
    rec = Recorder()
    engine = AsyncEngine(model, TOK, EngineConfig(**kw), observer=rec)
    engine.start()
    return engine, rec


async def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# Mixed policies, cache modes, prompt and generation lengths, block lengths, seeds.
LLADA_MIX = [
    ("semiar", "Hi", dict(algorithm="llada", max_tokens=16, block_length=8, steps=8)),
    ("semiar2", "A longer LLaDA prompt", dict(algorithm="llada", max_tokens=24, block_length=8, steps=24)),  # batched commits
    ("sampled", "The quick brown fox", dict(algorithm="llada", max_tokens=24, block_length=8, steps=12, temperature=0.8, seed=5)),
    ("random", "abc", dict(algorithm="llada", max_tokens=16, block_length=16, steps=8, remasking="random", seed=11)),
    ("cfg", "classifier free", dict(algorithm="llada", max_tokens=8, block_length=8, steps=8, cfg_scale=1.5)),
    ("thresh", "Once upon a time there", dict(algorithm="fast_dllm", max_tokens=32, block_length=8, threshold=0.9)),
    ("prefix", "x = 1; y =", dict(algorithm="fast_dllm", max_tokens=16, block_length=4, threshold=0.7, cache="prefix")),
    ("dual", "def f(a, b):", dict(algorithm="fast_dllm", max_tokens=24, block_length=8, factor=1.0, cache="dual")),
    ("fast_t", "Q: 2+2? A:", dict(algorithm="fast_dllm", max_tokens=20, block_length=8, threshold=0.9, temperature=0.7, seed=3)),
    ("d3llm", "Tell me", dict(algorithm="d3llm", max_tokens=32, block_length=8, threshold=0.5)),
    ("d3cache", "Cache it", dict(algorithm="d3llm", max_tokens=32, block_length=8, threshold=0.5, cache="prefix", cache_delay_iter=1)),
]
DREAM_MIX = [
    ("entropy", "Hello", dict(algorithm="dream", alg="entropy", max_tokens=16, steps=8)),
    ("entropy2", "Say more", dict(algorithm="dream", alg="entropy", max_tokens=24, steps=24)),  # batched commits
    ("maskgit", "A longer prompt here", dict(algorithm="dream", alg="maskgit_plus", max_tokens=24, steps=12, temperature=0.3, alg_temp=0.5, seed=1)),
    ("margin", "ok", dict(algorithm="dream", alg="topk_margin", max_tokens=8, steps=8)),
    ("origin", "sample me", dict(algorithm="dream", alg="origin", max_tokens=16, steps=16, temperature=0.5, top_p=0.9, seed=2)),
    ("d3dream", "Dream d3", dict(algorithm="d3llm", max_tokens=24, block_length=8, threshold=0.5)),
    ("d3cache", "Dream cached", dict(algorithm="d3llm", max_tokens=24, block_length=8, threshold=0.5, cache="prefix", cache_delay_iter=0, temperature=0.6, seed=4)),
]


# Equal prompt and canvas lengths: the forward is a plain (N, T) batch instead of packed rows.
SAME_LENGTH_MIX = [
    (f"same{i}", f"prompt {i}", dict(algorithm=alg, max_tokens=16, block_length=8, steps=8 if alg == "llada" else None, seed=i, temperature=t))
    for i, (alg, t) in enumerate([("llada", 0.0), ("llada", 0.9), ("fast_dllm", 0.0), ("fast_dllm", 0.5)])
]


@pytest.mark.parametrize("family", ["llada", "dream", "same_length"])
async def test_batched_results_equal_alone(
    family: str, llada: DiffusionModel, dream: DiffusionModel, caplog: pytest.LogCaptureFixture
) -> None:
    """N concurrent mixed requests produce exactly the tokens and NFE each produces alone."""
    model, mix = {"llada": (llada, LLADA_MIX), "dream": (dream, DREAM_MIX), "same_length": (llada, SAME_LENGTH_MIX)}[family]
    engine, rec = started(model, max_num_seqs=16)
    try:
        alone = {name: await collect(engine, req(name, p, **kw)) for name, p, kw in mix}
        assert max(s.batch_size for s in rec.steps) == 1
        rec.steps.clear()
        together = await asyncio.gather(*(collect(engine, req(name, p, **kw)) for name, p, kw in mix))
        assert max(s.batch_size for s in rec.steps) == len(mix), "requests did not share forwards"
        for (name, _, _), res in zip(mix, together):
            assert res.key() == alone[name].key(), name
        assert engine.stats().num_running == 0 and engine.stats().cache_bytes == 0
        assert "batched commit" not in caplog.text  # the batched path ran, not its one-by-one fall-back
    finally:
        await engine.shutdown(5)


async def test_join_and_leave_mid_flight(llada: DiffusionModel) -> None:
    """A request joining a running batch and leaving before it ends changes nobody's tokens."""
    long = ("long", "A long story:", dict(algorithm="llada", max_tokens=64, block_length=8, steps=64))
    short = ("short", "Hi!", dict(algorithm="fast_dllm", max_tokens=8, block_length=8, threshold=0.9, cache="dual"))
    engine, rec = started(llada)
    try:
        alone_long = await collect(engine, req(long[0], long[1], **long[2]))
        alone_short = await collect(engine, req(short[0], short[1], **short[2]))
        rec.steps.clear()
        order: list[str] = []

        async def run(name: str, prompt: str, kw: dict) -> Result:
            res = await collect(engine, req(name, prompt, **kw))
            order.append(name)
            return res

        task_long = asyncio.create_task(run(*long))
        await wait_for(lambda: len(rec.steps) >= 5)
        res_short = await run(*short)
        res_long = await task_long
        assert order == ["short", "long"]
        sizes = [s.batch_size for s in rec.steps]
        assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1  # joined, shared forwards, left
        assert res_long.key() == alone_long.key()
        assert res_short.key() == alone_short.key()
    finally:
        await engine.shutdown(5)


class EosBoostModel(DiffusionModel):
    """Test model: the golden tiny LLaDA with the EOS logit raised `boost` above the best other
    logit at canvas positions >= `start`, so EOS really is generated there, confidently."""

    def __init__(self, inner: DiffusionModel, start: int, boost: float = 10.0) -> None:
        super().__init__()
        self.inner = inner
        for name in ("model_type", "special_ids", "shift_logits", "vocab_size", "num_layers", "num_kv_heads", "head_dim"):
            setattr(self, name, getattr(inner, name))
        self.start, self.boost = start, boost

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        return self.inner.position_ids(valid)

    def forward(self, input_ids, positions, attention=None, logits_index=None):  # type: ignore[override]
        logits = self.inner(input_ids, positions, attention)
        eos = self.special_ids.eos
        raised = logits.max(dim=-1).values + self.boost
        logits[..., eos] = torch.where(positions >= self.start, raised, logits[..., eos])
        return select_logits(logits, logits_index)


@pytest.mark.parametrize(
    "params",
    [
        dict(algorithm="llada", max_tokens=32, block_length=8, steps=32),
        dict(algorithm="fast_dllm", max_tokens=32, block_length=8, threshold=0.9),
        dict(algorithm="fast_dllm", max_tokens=32, block_length=8, threshold=0.9, cache="dual"),
    ],
    ids=["llada", "fast_dllm", "fast_dllm_dual"],
)
async def test_eos_in_committed_prefix_stops_early(llada: DiffusionModel, params: dict) -> None:
    prompt = TOK.encode("Stop soon")
    answer_len = 5
    model = EosBoostModel(llada, start=len(prompt) + answer_len)
    engine, rec = started(model)
    try:
        res = await collect(engine, GenerationRequest("eos", prompt, DecodingParams(**params)))
    finally:
        await engine.shutdown(5)
    stop_ids = set(llada.special_ids.stop_ids())
    assert res.final.finish_reason == "stop"
    assert res.final.completion_tokens == len(res.ids) <= answer_len
    assert not stop_ids & set(res.ids), "EOS/EoT must not be part of the completion"
    assert res.final.prompt_tokens == len(prompt)
    # the first block (at most 8 forwards) holds the EOS: the 3 blocks after it are never decoded
    # (the full LLaDA schedule is 32 forwards)
    assert res.final.nfe <= 8
    assert rec.finished[0].nfe == res.final.nfe and rec.finished[0].finish_reason == "stop"


async def test_stop_string_cuts_text_and_is_never_streamed(llada: DiffusionModel) -> None:
    kw = dict(algorithm="llada", max_tokens=48, block_length=8, steps=48)
    engine, _ = started(llada)
    try:
        free = await collect(engine, req("free", "Write:", **kw))
        text = free.text
        cut = next(
            (i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i),
            None,
        )
        assert cut is not None, f"the tiny model's output is too short for this test: {text!r}"
        stop = text[cut : cut + 2]
        res = await collect(engine, req("stopped", "Write:", stop=[stop], **kw))
    finally:
        await engine.shutdown(5)
    assert res.final.finish_reason == "stop"
    assert res.text == text[:cut]
    assert stop not in res.text
    # usage counts the tokens up to the one completing the stop string, never more than produced
    assert len(res.ids) == res.final.completion_tokens <= len(free.ids)
    assert TOK.decode(res.ids).startswith(text[:cut]) and stop in TOK.decode(res.ids)
    assert stop not in TOK.decode(res.ids[:-1])


async def test_streaming_deltas_concatenate_to_final_text(llada: DiffusionModel) -> None:
    engine, rec = started(llada)
    try:
        res = await collect(engine, req("stream", "Stream this:", algorithm="llada", max_tokens=64, block_length=8, steps=64))
    finally:
        await engine.shutdown(5)
    assert len(res.outs) > 2, "a 64-token semi-autoregressive answer should stream in several deltas"
    assert res.text == TOK.decode(res.ids)  # every byte was eventually flushed, nothing twice
    assert res.final.completion_tokens == len(res.ids)
    (stats,) = rec.finished
    assert stats.completion_tokens == len(res.ids) and stats.nfe == res.final.nfe
    assert stats.steps >= stats.nfe and stats.e2e_s >= stats.queue_time_s >= 0
    assert stats.ttft_s is None or stats.ttft_s <= stats.e2e_s
    # a delta is only ever finalised text: each prefix of the stream is a prefix of the final text
    acc = ""
    for out in res.outs:
        acc += out.text_delta
        assert res.text.startswith(acc)


async def test_non_streaming_request_gets_one_output_holding_the_whole_stream(llada: DiffusionModel) -> None:
    """`stream=False` (vLLM's FINAL_ONLY): one output, equal to a streamed run's deltas joined, with stop
    strings, EOS and `max_tokens` alike; an aborted one still carries what was finalised before."""
    kw = dict(algorithm="llada", max_tokens=64, block_length=8, steps=64)
    engine, rec = started(llada)
    try:
        streamed = await collect(engine, req("s", "Stream this:", **kw))
        stop = streamed.text[len(streamed.text) // 2 :][:2]
        cases = [dict(kw), dict(kw, stop=[stop]), dict(kw, max_tokens=24, steps=24)]
        reasons = []
        for i, case in enumerate(cases):
            expected = await collect(engine, req(f"a{i}", "Stream this:", **dict(case)))
            request = req(f"b{i}", "Stream this:", **dict(case))
            request.stream = False
            got = await collect(engine, request)
            assert len(got.outs) == 1
            assert got.key() == expected.key()
            reasons.append(got.final.finish_reason)
        assert reasons[1] == "stop"
        assert len(streamed.outs) > 2

        slow = dict(algorithm="fast_dllm", max_tokens=64, block_length=8, threshold=1.0)
        request = req("cut", "Stream this:", **slow)
        request.stream = False
        before = len(rec.steps)
        task = asyncio.create_task(collect(engine, request))
        await wait_for(lambda: len(rec.steps) > before + 20)  # a third of the canvas final, none sent
        engine.cancel("cut")
        cut = await task
        free = await collect(engine, req("free", "Stream this:", **slow))
    finally:
        await engine.shutdown(5)
    assert len(cut.outs) == 1 and cut.final.finish_reason == "abort"
    assert cut.ids and free.ids[: len(cut.ids)] == cut.ids and free.text.startswith(cut.text)


async def test_cancel_frees_batch_slot_and_cache(llada: DiffusionModel) -> None:
    engine, rec = started(llada)
    slow = dict(algorithm="fast_dllm", max_tokens=64, block_length=8, threshold=1.0, cache="dual")
    try:
        task = asyncio.create_task(collect(engine, req("c1", "cancel me", **slow)))
        await wait_for(lambda: engine.stats().cache_bytes > 0)
        engine.cancel("c1")
        res = await task
        assert res.final.finish_reason == "abort" and res.final.error
        assert res.final.nfe < 64
        s = engine.stats()
        assert (s.num_running, s.num_waiting, s.cache_bytes, s.reserved_cache_bytes) == (0, 0, 0, 0)

        # a disconnecting client: the consumer task is cancelled while iterating
        consumer = asyncio.create_task(collect(engine, req("c2", "disconnect", **slow)))
        await wait_for(lambda: engine.stats().num_running == 1 and engine.stats().cache_bytes > 0)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await wait_for(lambda: engine.stats().num_running == 0, timeout=10)
        assert engine.stats().cache_bytes == 0
        assert [f.finish_reason for f in rec.finished] == ["abort", "abort"]
        # the engine goes on serving
        ok = await collect(engine, req("after", "still alive", algorithm="llada", max_tokens=8, block_length=8, steps=8))
        assert ok.final.finish_reason in ("stop", "length")
    finally:
        await engine.shutdown(5)


async def test_waiting_queue_overflow_is_retryable_error(llada: DiffusionModel) -> None:
    engine, _ = started(llada, max_num_seqs=1, max_waiting=1)
    slow = dict(algorithm="llada", max_tokens=64, block_length=8, steps=64)
    try:
        first = asyncio.create_task(collect(engine, req("q1", "one", **slow)))
        await wait_for(lambda: engine.stats().num_running == 1)
        second = asyncio.create_task(collect(engine, req("q2", "two", **slow)))
        await wait_for(lambda: engine.stats().num_running == 1 and engine.stats().num_waiting == 1)
        with pytest.raises(QueueFullError) as err:
            await collect(engine, req("q3", "three", **slow))
        assert err.value.retryable
        engine.cancel("q2")  # the waiting one leaves the queue without ever running
        assert (await second).final.finish_reason == "abort"
        assert (await second).final.nfe == 0
        engine.cancel("q1")
        await first
    finally:
        await engine.shutdown(5)


class FailingPolicy(DecodingPolicy):
    """Test-only: a real policy that breaks `where` it is told: in `init`, in its `fail_at`-th `commit`,
    or with ids that break the embedding lookup of its `fail_at`-th forward. Records the thread `init` ran on."""

    def __init__(self, inner: DecodingPolicy, where: str = "commit", fail_at: int = 3) -> None:
        self.inner, self.where, self.fail_at, self.calls = inner, where, fail_at, 0
        self.init_thread: str | None = None

    def init(self, seq: Sequence) -> None:
        self.init_thread = threading.current_thread().name
        if self.where == "init":
            raise RuntimeError("injected start-up failure")
        self.inner.init(seq)

    def plan(self, seq: Sequence) -> ForwardSpec | None:
        spec = self.inner.plan(seq)
        if self.where == "forward" and spec is not None and seq.nfe + 1 == self.fail_at:
            spec.input_ids = torch.full_like(spec.input_ids, 10**6)  # breaks the embedding lookup
        return spec

    def commit(self, seq: Sequence, logits: torch.Tensor) -> None:
        self.calls += 1
        if self.where == "commit" and self.calls == self.fail_at:
            raise RuntimeError("injected policy failure")
        self.inner.commit(seq, logits)


async def test_requests_start_on_the_worker_thread_not_the_event_loop(llada: DiffusionModel) -> None:
    """Canvas, generator and policy state are made by the engine's worker at admission: on a GPU a
    host-to-device copy or read-back on the event loop would wait for the forward in flight."""
    policies: list[FailingPolicy] = []

    def factory(params: DecodingParams, model: DiffusionModel) -> DecodingPolicy:
        policies.append(FailingPolicy(build_policy(params, model), where="nowhere"))
        return policies[-1]

    kw = dict(algorithm="llada", max_tokens=16, block_length=8, steps=16)
    plain, _ = started(llada)
    engine = AsyncEngine(llada, TOK, EngineConfig(), policy_factory=factory)
    engine.start()
    try:
        expected = await collect(plain, req("a", "one two", **kw))
        got = await collect(engine, req("a", "one two", **kw))
    finally:
        await asyncio.gather(plain.shutdown(5), engine.shutdown(5))
    assert [p.init_thread for p in policies] == ["dllm-engine"]
    assert got.key() == expected.key()


@pytest.mark.parametrize("where", ["init", "commit", "forward"])
async def test_failing_request_fails_alone(llada: DiffusionModel, where: str) -> None:
    def factory(params: DecodingParams, model: DiffusionModel) -> DecodingPolicy:
        policy = build_policy(params, model)
        return FailingPolicy(policy, where) if params.seed == 666 else policy

    rec = Recorder()
    engine = AsyncEngine(llada, TOK, EngineConfig(), observer=rec, policy_factory=factory)
    engine.start()
    good = LLADA_MIX[:3]
    try:
        alone = [await collect(engine, req(n, p, **kw)) for n, p, kw in good]
        bad = req("bad", "I will fail", algorithm="llada", max_tokens=16, block_length=8, steps=16, seed=666)
        results = await asyncio.gather(collect(engine, bad), *(collect(engine, req(n, p, **kw)) for n, p, kw in good))
        failed, others = results[0], results[1:]
        assert failed.final.finish_reason == "error"
        if where != "forward":
            assert f"injected {'start-up' if where == 'init' else 'policy'} failure" in failed.final.error
        assert failed.final.error
        assert [r.key() for r in others] == [r.key() for r in alone]
        assert engine.stats().num_running == 0
        assert engine.stats().reserved_cache_bytes == 0
    finally:
        await engine.shutdown(5)


async def test_kv_cache_memory_bound_holds_requests_back(llada: DiffusionModel) -> None:
    kw = dict(algorithm="fast_dllm", max_tokens=32, block_length=8, threshold=0.9, cache="dual")
    prompts = ["prompt one", "prompt two", "prompt six"]  # same length: same footprint
    probe, _ = started(llada)
    try:
        alone = [await collect(probe, req(f"a{i}", p, **kw)) for i, p in enumerate(prompts)]
    finally:
        await probe.shutdown(5)
    canvas = len(TOK.encode(prompts[0])) + 32
    per_request = 2 * llada.num_layers * llada.num_kv_heads * canvas * llada.head_dim * 4
    engine, rec = started(llada, max_cache_bytes=int(per_request * 1.5))
    try:
        results = await asyncio.gather(*(collect(engine, req(f"m{i}", p, **kw)) for i, p in enumerate(prompts)))
        with pytest.raises(RequestValidationError) as err:
            await collect(engine, req("huge", "x" * 40, **kw))
        assert err.value.param == "cache"
    finally:
        await engine.shutdown(5)
    assert [r.key() for r in results] == [r.key() for r in alone]
    assert all(s.num_running <= 1 and s.cache_bytes <= per_request for s in rec.steps)
    assert max(s.cache_bytes for s in rec.steps) == per_request  # the estimate is what is allocated
    assert [f.request_id for f in rec.finished] == ["m0", "m1", "m2"]  # FIFO


@pytest.mark.parametrize(
    ("request_kw", "param"),
    [
        (dict(prompt=[], params=DecodingParams()), "prompt"),
        (dict(prompt=[1, 2, 250], params=DecodingParams()), "prompt"),  # the mask id
        (dict(prompt=[1, 2, 256], params=DecodingParams()), "prompt"),  # outside the vocabulary
        (dict(prompt=[1, 2], params=DecodingParams(max_tokens=200)), "max_tokens"),
        (dict(prompt=[1, 2], params=DecodingParams(algorithm="llada", max_tokens=16, block_length=8, steps=3)), "steps"),
        (dict(prompt=[1, 2], params=DecodingParams(temperature=-1.0)), "temperature"),
        (dict(prompt=[1, 2], params=DecodingParams(algorithm="llada", max_tokens=64, block_length=8, cfg_scale=1.0)), "cfg_scale"),
        (dict(prompt=[1, 2], params=DecodingParams(), stop=[3]), "stop"),
    ],
)
async def test_invalid_requests_are_refused_naming_the_param(llada: DiffusionModel, request_kw: dict, param: str) -> None:
    engine, _ = started(llada, max_model_len=128, max_num_batched_tokens=128)
    try:
        request = GenerationRequest("bad", request_kw["prompt"], request_kw["params"], stop=request_kw.get("stop", []))
        with pytest.raises(RequestValidationError) as err:
            await collect(engine, request)
        assert err.value.param == param
        assert str(err.value).startswith(param)
        assert engine.stats().num_waiting == 0
    finally:
        await engine.shutdown(5)


async def test_duplicate_in_flight_request_id_is_refused(llada: DiffusionModel) -> None:
    engine, _ = started(llada)
    slow = dict(algorithm="llada", max_tokens=64, block_length=8, steps=64)
    try:
        task = asyncio.create_task(collect(engine, req("same", "one", **slow)))
        await wait_for(lambda: engine.stats().num_running == 1)
        with pytest.raises(RequestValidationError) as err:
            await collect(engine, req("same", "two", **slow))
        assert err.value.param == "request_id"
        engine.cancel("same")
        await task
        # once finished, the id may be used again
        again = await collect(engine, req("same", "three", algorithm="llada", max_tokens=8, block_length=8, steps=8))
        assert again.final.finish_reason in ("stop", "length")
    finally:
        await engine.shutdown(5)


async def test_graceful_shutdown_finishes_in_flight_then_refuses(llada: DiffusionModel) -> None:
    engine, _ = started(llada)
    kw = dict(algorithm="llada", max_tokens=16, block_length=8, steps=16)
    tasks = [asyncio.create_task(collect(engine, req(f"s{i}", f"prompt {i}", **kw))) for i in range(3)]
    await wait_for(lambda: engine.stats().num_running + engine.stats().num_waiting == 3)
    await engine.shutdown(timeout=60)
    results = [await t for t in tasks]
    assert all(r.final.finish_reason in ("stop", "length") for r in results)
    with pytest.raises(EngineShutdownError):
        await collect(engine, req("late", "too late", **kw))


async def test_shutdown_timeout_aborts_the_rest(llada: DiffusionModel) -> None:
    engine, _ = started(llada, max_num_seqs=1)
    slow = dict(algorithm="llada", max_tokens=64, block_length=8, steps=64)
    running = asyncio.create_task(collect(engine, req("r", "running", **slow)))
    waiting = asyncio.create_task(collect(engine, req("w", "waiting", **slow)))
    await wait_for(lambda: engine.stats().num_running == 1 and engine.stats().num_waiting == 1)
    await engine.shutdown(timeout=0)
    for task in (running, waiting):
        res = await task
        assert res.final.finish_reason == "abort" and "shut down" in res.final.error


async def test_event_loop_stays_responsive_while_stepping(tiny_llada_dir) -> None:
    """The worker thread steps a real HF-folder model (126k vocabulary: slow steps) while the loop ticks."""
    from dllm_runtime.models import load_model
    from dllm_runtime.tokenizer import load_tokenizer

    model, tokenizer = load_model(tiny_llada_dir), load_tokenizer(tiny_llada_dir)
    engine = AsyncEngine(model, tokenizer, EngineConfig())
    engine.start()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    try:
        prompt = tokenizer.encode("Hello there, how are you?")
        results = await asyncio.gather(
            *(
                collect(engine, GenerationRequest(f"t{i}", prompt, DecodingParams(algorithm="llada", max_tokens=32, block_length=8, steps=32)))
                for i in range(4)
            )
        )
    finally:
        stop.set()
        await tick
        await engine.shutdown(5)
    busy = time.perf_counter() - start
    steps = engine.stats().total_steps
    assert all(1 <= r.final.nfe <= 32 for r in results) and steps >= 4
    # while the engine was busy for `busy` seconds the loop kept ticking every few milliseconds:
    # no gap anywhere near the length of a generation (or even of several steps)
    assert busy > 0.3, "not enough engine work to measure anything"
    assert max(gaps) < max(0.25, 3 * busy / steps), (max(gaps), busy, steps)
    assert len(gaps) > busy / 0.05
