"""`EngineProcess`: the real engine in a real child process (spawn), driven through its pipe.

Each test starts its own child (about 2 s: the child imports torch and loads the built-in demo model).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.demo import demo_model_path
from dllm_runtime.engine import (
    AsyncEngine,
    EngineConfig,
    EngineShutdownError,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
)
from dllm_runtime.engine.process import EngineLoadError, EngineProcess, EngineSpec
from dllm_runtime.models import load_model
from dllm_runtime.tokenizer import load_tokenizer

MODEL = demo_model_path()
CONFIG = EngineConfig(max_num_seqs=4, max_model_len=512, max_num_batched_tokens=2048)


class Recorder:
    def __init__(self) -> None:
        self.steps, self.finished = [], []

    def on_step(self, stats) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats) -> None:
        self.finished.append(stats)


@pytest.fixture
async def process():
    recorder = Recorder()
    engine = EngineProcess(EngineSpec(str(MODEL), None, "cpu", CONFIG), observer=recorder)
    info = await asyncio.to_thread(engine.load)
    assert (info.model_type, info.device) == ("llada", "cpu")
    engine.recorder = recorder
    yield engine
    await engine.shutdown(5)
    assert not engine.is_running


def prompt(text: str) -> list[int]:
    return load_tokenizer(MODEL).encode(text)


async def run(engine, request: GenerationRequest):
    outs = [out async for out in engine.generate(request)]
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return outs


MIXED = [
    ("greedy", "Question: Tom has 3 apples and buys 5 more. How many?\nAnswer:", DecodingParams(max_tokens=24)),
    ("llada", "Q: What is 7 times 6?\nA:", DecodingParams(algorithm="llada", max_tokens=16, block_length=8)),
    ("sampled", "Natalia sold clips", DecodingParams(max_tokens=20, temperature=0.8, seed=7)),
    ("dual", "Question: 2 + 2?\nAnswer:", DecodingParams(max_tokens=32, cache="dual")),
]


async def test_outputs_equal_the_in_process_engine(process):
    """Mixed concurrent requests give the same text, tokens, usage and NFE across the process boundary."""
    requests = [GenerationRequest(rid, prompt(text), params) for rid, text, params in MIXED]
    remote = await asyncio.gather(*(run(process, r) for r in requests))
    local_engine = AsyncEngine(load_model(MODEL), load_tokenizer(MODEL), CONFIG)
    local_engine.start()
    try:
        local = await asyncio.gather(*(run(local_engine, r) for r in requests))
    finally:
        await local_engine.shutdown(5)
    for got, want in zip(remote, local):
        assert "".join(o.text_delta for o in got) == "".join(o.text_delta for o in want)
        assert [t for o in got for t in o.token_ids_delta] == [t for o in want for t in o.token_ids_delta]
        assert (got[-1].finish_reason, got[-1].completion_tokens, got[-1].nfe) == (
            want[-1].finish_reason, want[-1].completion_tokens, want[-1].nfe)
    # the child's statistics reach the parent: observer events and the stats() snapshot
    assert len(process.recorder.finished) == len(requests)
    assert sum(s.batch_size for s in process.recorder.steps) == sum(o[-1].nfe for o in remote)
    stats = process.stats()
    assert stats.total_requests_finished == len(requests) and stats.num_running == 0


async def test_rejections_are_raised_before_the_first_output(process):
    with pytest.raises(RequestValidationError) as err:
        await run(process, GenerationRequest("long", prompt("hi"), DecodingParams(max_tokens=5000)))
    assert err.value.param == "max_tokens" and "maximum context length" in str(err.value)
    with pytest.raises(RequestValidationError) as err:
        await run(process, GenerationRequest("bad", [10**9], DecodingParams(max_tokens=4)))
    assert err.value.param == "prompt"
    outs = await run(process, GenerationRequest("ok", prompt("hi"), DecodingParams(max_tokens=4)))
    assert outs[-1].finish_reason in ("stop", "length")  # a rejection does not disturb what follows


async def test_queue_full_and_duplicate_ids_are_refused():
    config = EngineConfig(max_num_seqs=1, max_waiting=1, max_model_len=512, max_num_batched_tokens=2048)
    engine = EngineProcess(EngineSpec(str(MODEL), None, "cpu", config))
    await asyncio.to_thread(engine.load)
    try:
        slow = GenerationRequest("slow", prompt("tell me a story"), DecodingParams(algorithm="llada", max_tokens=64, ignore_eos=True))
        stream = engine.generate(slow)
        first = await stream.__anext__()  # admitted and running
        assert not first.finished
        with pytest.raises(RequestValidationError, match="already in flight"):
            await run(engine, GenerationRequest("slow", prompt("again"), DecodingParams(max_tokens=4)))
        waiting = asyncio.ensure_future(run(engine, GenerationRequest("waits", prompt("me"), DecodingParams(max_tokens=4))))
        while not engine.stats().num_waiting:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="queue is full"):
            await run(engine, GenerationRequest("next", prompt("me too"), DecodingParams(max_tokens=4)))
        await stream.aclose()  # frees the slot: the waiting request runs
        assert (await waiting)[-1].finish_reason in ("stop", "length")
    finally:
        await engine.shutdown(5)


async def test_leaving_early_cancels_the_request_in_the_child(process):
    request = GenerationRequest("gone", prompt("tell me a story"), DecodingParams(algorithm="llada", max_tokens=128, ignore_eos=True))
    stream = process.generate(request)
    await stream.__anext__()
    await stream.aclose()  # a client disconnect
    deadline = time.monotonic() + 10
    while process.stats().num_running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert process.stats().num_running == 0
    assert process.recorder.finished[-1].finish_reason == "abort"


async def test_a_crashed_engine_fails_open_requests_and_refuses_new_ones(process):
    stream = process.generate(GenerationRequest("doomed", prompt("tell me a story"),
                                                DecodingParams(algorithm="llada", max_tokens=256, ignore_eos=True)))
    await stream.__anext__()
    os.kill(process._process.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
    outs = [out async for out in stream]
    assert outs[-1].finished and outs[-1].finish_reason == "error" and "unexpectedly" in outs[-1].error
    assert not process.is_running  # the server's liveness check reads this
    with pytest.raises(EngineShutdownError):
        await run(process, GenerationRequest("after", prompt("hi"), DecodingParams(max_tokens=4)))


async def test_shutdown_lets_in_flight_requests_finish(process):
    task = asyncio.ensure_future(run(process, GenerationRequest("inflight", prompt("Q: 1 + 1?\nA:"),
                                                                DecodingParams(max_tokens=32))))
    while not process.stats().num_running:
        await asyncio.sleep(0.01)
    await process.shutdown(30)
    outs = await task
    assert outs[-1].finish_reason in ("stop", "length")
    assert not process.is_running


async def test_a_model_that_fails_to_load_reports_the_childs_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    engine = EngineProcess(EngineSpec(str(tmp_path), None, "cpu", CONFIG))
    with pytest.raises(EngineLoadError, match="ModelLoadError: .*no model.safetensors"):
        await asyncio.to_thread(engine.load)
    assert not engine.is_running
