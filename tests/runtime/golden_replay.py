"""Drive decoding policies over golden cases through the real step loop (tests only).

Two ways to feed the forwards:

* `ReplayModel` returns the logits the reference saw (`*_golden_tensors.safetensors`, raw and
  unshifted) and asserts that every forward receives exactly the recorded `trace[i].input_ids`:
  the decoder in isolation, separated from model numerics (ALGORITHMS.md §4.5 step 2). It stands in
  for the model only; batching, padding and the policy run for real.
* the real tiny model loaded from `tests/golden/*_tiny.*` (end to end, §4.5 step 3).

It is also the one place the test modules load the golden files from (cases, tensors, tiny models)
and take the `one_thread` fixture from.

Sequences are built as the reference builds its canvas: prompt (left-padded rows keep their pads)
followed by `gen_length` MASK slots, `RandomSource(seed_before_call)` per sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dllm_runtime.decoding.base import ForwardSpec, RandomSource, Sequence
from dllm_runtime.decoding.registry import policy_from_reference
from dllm_runtime.engine.step import run_to_completion
from dllm_runtime.models.base import DiffusionModel, SpecialIds, select_logits

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY_SPECIAL = SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)


@lru_cache(maxsize=None)
def golden_cases(family: str) -> dict[str, dict[str, Any]]:
    data = json.loads((GOLDEN / f"{family}_golden.json").read_text())
    return {case["name"]: case for case in data["cases"]}


@lru_cache(maxsize=None)
def golden_tensors(family: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / f"{family}_golden_tensors.safetensors"))


@lru_cache(maxsize=None)
def tiny_model(
    name: str, dtype: str | None = "float32", special_ids: SpecialIds | None = TINY_SPECIAL
) -> DiffusionModel:
    """`llada_tiny` / `dream_tiny`, loaded once per setting: fp32 with the golden special ids unless
    asked otherwise; `None` leaves dtype / ids to the loader (the model tests check what it reads)."""
    from dllm_runtime.models import load_model_files

    model = load_model_files(
        GOLDEN / f"{name}_config.json", [GOLDEN / f"{name}.safetensors"], dtype=dtype, special_ids=special_ids
    )
    return model.eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module: the golden set was made that way (fp32 sums depend on the
    split), and the test machine's few shared cores are not oversubscribed.

    Import it into a test module and name it in `pytest.mark.usefixtures`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ReplayModel(DiffusionModel):
    """Returns the recorded logits of forward i and checks its input (a stand-in for the model)."""

    def __init__(self, case: dict[str, Any], tensors: dict[str, torch.Tensor], shift: bool) -> None:
        nn.Module.__init__(self)
        self.trace = case["trace"]
        self.tensors = tensors
        self.calls = 0
        self.special_ids = TINY_SPECIAL
        self.shift_logits = shift
        self.model_type = "Dream" if shift else "llada"
        self.num_layers = 1
        self.vocab_size = 256

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:  # pragma: no cover - unused
        raise AssertionError("policies take positions from their own rule")

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Any = None, logits_index: Any = None
    ) -> torch.Tensor:
        assert self.calls < len(self.trace), f"forward {self.calls}: the reference made only {len(self.trace)}"
        expected = torch.tensor(self.trace[self.calls]["input_ids"])
        assert torch.equal(input_ids, expected), (
            f"forward {self.calls}: input differs at {(input_ids != expected).nonzero().tolist()[:8]}"
        )
        logits = self.tensors[self.trace[self.calls]["logits_key"]]
        self.calls += 1
        return select_logits(logits, logits_index)


def new_seq(prompt: list[int], slots: int, seed: int | None = 0) -> Sequence:
    """One unpadded sequence `prompt | MASK * slots` with the golden special ids and its own seed."""
    canvas = torch.tensor([prompt + [TINY_SPECIAL.mask] * slots])
    return Sequence(canvas=canvas, prompt_len=len(prompt), special=TINY_SPECIAL, rng=RandomSource(seed))


def random_spec(
    model: DiffusionModel,
    gen: torch.Generator,
    length: int,
    rows: int = 1,
    left_pad: int = 0,
    logits_at: list[int] | None = None,
) -> tuple[Sequence, ForwardSpec]:
    """A planned forward of random ids for step-loop tests: `rows` rows of `length` tokens, the first
    `left_pad` of them padding, and logits wanted at `logits_at` (None: everywhere)."""
    ids = torch.randint(0, 248, (rows, length), generator=gen)
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[:, :left_pad] = False
    at = None
    if logits_at is not None:
        at = torch.zeros(length, dtype=torch.bool)
        at[logits_at] = True
    seq = Sequence(canvas=ids[:1], prompt_len=length, special=model.special_ids, rng=RandomSource(0))
    return seq, ForwardSpec(ids, model.position_ids(valid), valid if left_pad else None, logits_at=at)


def build_sequences(case: dict[str, Any], special: SpecialIds, gen_length: int) -> list[Sequence]:
    """One sequence per prompt row: `prompt | MASK * gen_length`, pads marked invalid."""
    prompt = torch.tensor(case["prompt"])
    am = case.get("attention_mask") or case.get("kwargs", {}).get("attention_mask")
    seqs = []
    for row in range(prompt.shape[0]):
        canvas = torch.cat([prompt[row], torch.full((gen_length,), special.mask)])[None]
        valid = None
        if am is not None and 0 in am[row]:
            valid = torch.cat([torch.tensor(am[row], dtype=torch.bool), torch.ones(gen_length, dtype=torch.bool)])[None]
        # seeded per row: every golden sampling case has B = 1, so this is the reference's stream
        seqs.append(
            Sequence(canvas=canvas, prompt_len=prompt.shape[1], special=special,
                     rng=RandomSource(case["seed_before_call"]), valid=valid)
        )
    return seqs


def run_case(case: dict[str, Any], model: DiffusionModel) -> tuple[list[Sequence], Any]:
    """Build the case's policy from its reference + kwargs and run it through the step loop."""
    decoder = policy_from_reference(case["reference"], case["kwargs"], TINY_SPECIAL)
    seqs = build_sequences(case, decoder.special, decoder.gen_length)
    run_to_completion(model, [(seq, decoder.policy) for seq in seqs])
    return seqs, decoder


def output_of(seqs: list[Sequence]) -> list[list[int]]:
    return [seq.canvas[0].tolist() for seq in seqs]
