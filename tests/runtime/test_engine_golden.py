"""The serving engine reproduces the golden reference decodes, alone and all batched together.

Every single-prompt golden case (LLaDA, Fast-dLLM with no/prefix/dual cache, Dream, d3LLM) runs
through `AsyncEngine` with the real tiny model: the policy comes from the case's reference call
(`policy_from_reference`, via the engine's `policy_factory` seam), the canvas, seed and step loop
are the engine's own. The engine stops a request at the first EOS/EoT of its finalised prefix, so
the expected answer is the reference's generation cut there; without a stop token, the NFE must
equal the reference's forward count too; with `ignore_eos` (vLLM's flag) the whole generation and
the NFE must equal the reference's. Then all cases of one model run concurrently in one
engine (mixed decoders, cache modes and step schedules sharing forwards) with the same results.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import policy_from_reference
from dllm_runtime.engine import AsyncEngine, EngineConfig, GenerationRequest
from tests.helpers.byte_tokenizer import ByteTokenizer
from tests.runtime.golden_replay import TINY_SPECIAL, golden_cases, tiny_model

pytestmark = pytest.mark.timeout(300)

STOP_IDS = set(TINY_SPECIAL.stop_ids())


def single_prompt_cases(model: str) -> list[dict[str, Any]]:
    cases = [c for fam in ("llada", "dream", "d3llm") for c in golden_cases(fam).values()]
    return [c for c in cases if c["model"] == model and len(c["prompt"]) == 1]


def expected(case: dict[str, Any], ignore_eos: bool = False) -> tuple[list[int], str, int | None]:
    """(answer ids, finish reason, exact NFE or None when the engine may stop earlier)."""
    prompt_len = len(case["prompt"][0])
    gen = case["output"][0][prompt_len:]
    cut = None if ignore_eos else next((i for i, t in enumerate(gen) if t in STOP_IDS), None)
    if cut is None:
        return [t for t in gen if t != TINY_SPECIAL.mask], "length", len(case["trace"])
    return gen[:cut], "stop", None


def factory(params: DecodingParams, model: Any):
    case = params.extra["case"]
    return policy_from_reference(case["reference"], case["kwargs"], TINY_SPECIAL).policy


def request(case: dict[str, Any], ignore_eos: bool) -> GenerationRequest:
    gen = policy_from_reference(case["reference"], case["kwargs"], TINY_SPECIAL).gen_length
    # the settings only size the canvas; the case's reference policy does the decoding
    params = DecodingParams(
        algorithm="llada", max_tokens=gen, block_length=gen, steps=gen, seed=case["seed_before_call"], extra={"case": case}
    )
    params.ignore_eos = ignore_eos  # vLLM's flag, a DecodingParams field
    return GenerationRequest(case["name"], case["prompt"][0], params)


async def run(engine: AsyncEngine, case: dict[str, Any], ignore_eos: bool) -> tuple[list[int], str, int]:
    ids, final = [], None
    async for out in engine.generate(request(case, ignore_eos)):
        ids += out.token_ids_delta
        final = out
    assert final is not None and final.finished
    return ids, final.finish_reason, final.nfe


def check(case: dict[str, Any], got: tuple[list[int], str, int], ignore_eos: bool) -> None:
    ids, reason, nfe = got
    want_ids, want_reason, want_nfe = expected(case, ignore_eos)
    assert (ids, reason) == (want_ids, want_reason), case["name"]
    if want_nfe is not None:
        assert nfe == want_nfe, case["name"]
    else:
        assert nfe <= len(case["trace"]), case["name"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the golden vectors were made
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("ignore_eos", [False, True], ids=["early_stop", "ignore_eos"])
@pytest.mark.parametrize("model_name", ["llada_tiny", "dream_tiny"])
async def test_engine_reproduces_golden_cases_alone_and_batched(model_name: str, ignore_eos: bool) -> None:
    cases = single_prompt_cases(model_name)
    assert len(cases) >= 10
    engine = AsyncEngine(tiny_model(model_name), ByteTokenizer(), EngineConfig(max_num_seqs=len(cases)), policy_factory=factory)
    engine.start()
    try:
        for case in cases:
            check(case, await run(engine, case, ignore_eos), ignore_eos)
        together = await asyncio.gather(*(run(engine, case, ignore_eos) for case in cases))
        for case, got in zip(cases, together):
            check(case, got, ignore_eos)
        assert engine.stats().total_steps > 0 and engine.stats().cache_bytes == 0
    finally:
        await engine.shutdown(5)
