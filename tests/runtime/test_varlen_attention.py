"""The varlen FlashAttention path of `ragged_sdpa` (issue #7), checked on CPU with a stand-in kernel.

A GPU (and with it flash-attn or PyTorch's own varlen kernel) cannot run here, so these tests replace
`dllm_runtime.models.attention._flash_attn_varlen_func` with a pure-torch reference of
`flash_attn_varlen_func`'s contract (per packed segment: non-causal SDPA of its query rows against
its key/value rows, GQA by repeating kv heads, softmax scale 1/sqrt(D)) and force
`dllm_runtime.engine.step.use_varlen` on for fp32 CPU tensors. They check what the step loop hands
the kernel (packing, cumulative lengths, dropped pad keys, cache key order, GQA) and that its output
lands where the per-group SDPA path puts it; the real kernel's numerics are for a GPU machine.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dllm_runtime.decoding.base import ForwardSpec, RandomSource, Sequence
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine import step
from dllm_runtime.engine.step import _Row, batched_forward, ragged_sdpa, run_to_completion
from dllm_runtime.models import attention
from tests.runtime.golden_replay import one_thread, random_spec, tiny_model  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class StandIn:
    """Reference `flash_attn_varlen_func` that records the segment lengths of every call."""

    calls: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (query, key) lengths

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool = False,
    ) -> torch.Tensor:
        assert not causal
        assert q.dim() == k.dim() == v.dim() == 3 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.device == q.device and int(cu[0]) == 0
        len_q, len_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        assert (max_seqlen_q, max_seqlen_k) == (max(len_q), max(len_k))
        self.calls.append((len_q, len_k))
        rep = q.shape[1] // k.shape[1]
        out = []
        for qs, ks, vs in zip(q.split(len_q), k.split(len_k), v.split(len_k)):
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None],
                ks.transpose(0, 1).repeat_interleave(rep, dim=0)[None],
                vs.transpose(0, 1).repeat_interleave(rep, dim=0)[None],
                is_causal=False,
                scale=1 / math.sqrt(q.shape[-1]),
            )
            out.append(o[0].transpose(0, 1))
        return torch.cat(out)


@pytest.fixture
def varlen(monkeypatch: pytest.MonkeyPatch):
    """Returns `force()`: installs the stand-in kernel, forces the dispatch on, returns the stand-in."""

    def force() -> StandIn:
        stand_in = StandIn()
        monkeypatch.setattr(attention, "_flash_attn_varlen_func", stand_in)
        monkeypatch.setattr(step, "use_varlen", lambda q: True)
        return stand_in

    return force


def test_dispatch_stays_on_sdpa_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with a varlen kernel installed, CPU (and fp32) tensors keep the bit-exact SDPA groups."""
    monkeypatch.setattr(attention, "_flash_attn_varlen_func", StandIn())
    assert attention.varlen_available()
    assert not step.use_varlen(torch.zeros(1, 2, 3, 4))
    assert not step.use_varlen(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16))


def test_cpu_processes_never_import_torch_dynamo() -> None:
    """torch._dynamo costs ~1.3 s to import (torch's varlen module and `normal_` on the meta device pull it
    in): a CPU process (tests, CLI, CPU serving) that loads both tiny models and decodes must not pay for
    it; the varlen kernel is looked up on a GPU's first use, the loader's skeleton is not initialised."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from dllm_runtime.decoding.base import RandomSource, Sequence
        from dllm_runtime.decoding.params import DecodingParams
        from dllm_runtime.decoding.registry import build_policy
        from dllm_runtime.engine.step import run_to_completion
        from dllm_runtime.models import attention
        from tests.runtime.golden_replay import tiny_model

        for name, algorithm in (("llada_tiny", "llada"), ("dream_tiny", "dream")):
            model = tiny_model(name)
            params = DecodingParams(algorithm=algorithm, max_tokens=4, block_length=4)
            canvas = torch.full((1, 9), model.special_ids.mask, dtype=torch.long)
            canvas[0, :5] = torch.arange(5)
            seq = Sequence(canvas=canvas, prompt_len=5, special=model.special_ids, rng=RandomSource(0))
            run_to_completion(model, [(seq, build_policy(params, model))])
            assert seq.nfe > 0
        print(attention._flash_attn_varlen_func is attention._UNRESOLVED, "torch._dynamo" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("model_name", ["llada_tiny", "dream_tiny"])  # dream_tiny: 4 q heads, 2 kv heads
def test_packed_batch_logits_match_sdpa(varlen, model_name: str) -> None:
    """(a)+(c)+(d) A mixed-length packed batch (left padding, a 2-row spec, a padded tail): one
    kernel call per layer with the rows' lengths, logits as the per-group SDPA path's."""
    model = tiny_model(model_name)
    gen = torch.Generator().manual_seed(0)

    def spec(length: int, rows: int = 1, left_pad: int = 0) -> tuple[Sequence, ForwardSpec]:
        return random_spec(model, gen, length, rows, left_pad)

    work = [spec(5), spec(9), spec(17, rows=2), spec(30, left_pad=3), spec(40), spec(9)]
    with torch.inference_mode():
        expected = batched_forward(model, work, min_tokens=160)  # 127 tokens + a padded tail
        stand_in = varlen()
        got = batched_forward(model, work, min_tokens=160)

    lengths = [5, 9, 17, 17, 30, 40, 9]
    assert stand_in.calls == [(lengths, [5, 9, 17, 17, 27, 40, 9])] * model.num_layers
    for a, b in zip(expected, got):  # the left-padded row differs by a few fp32 ulps (mask vs. dropped
        assert a.shape == b.shape  # keys); the tiny golden models' logits reach ~90, where an ulp is 8e-6
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_requests_decode_the_same_tokens(varlen, cache: str) -> None:
    """(b)+(c) Fast-dLLM requests on a block KV cache, batched with one that has none, through the
    real step loop: the same tokens with the varlen kernel as with SDPA, and the kernel saw each
    cache row's keys beyond its window."""
    model = tiny_model("llada_tiny")
    common = dict(algorithm="fast_dllm", max_tokens=16, block_length=8, threshold=0.7)
    params = [DecodingParams(cache=cache, **common), DecodingParams(cache=cache, **common), DecodingParams(**common)]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 248, (n,), generator=gen) for n in (7, 12, 5)]

    def decode() -> list[list[int]]:
        batch = []
        for p, prm in zip(prompts, params):
            canvas = torch.full((1, len(p) + prm.generation_slots()), model.special_ids.mask, dtype=torch.long)
            canvas[0, : len(p)] = p
            seq = Sequence(canvas=canvas, prompt_len=len(p), special=model.special_ids, rng=RandomSource(0))
            batch.append((seq, build_policy(prm, model)))
        run_to_completion(model, batch)
        return [seq.canvas[0, seq.prompt_len :].tolist() for seq, _ in batch]

    expected = decode()
    stand_in = varlen()
    assert decode() == expected
    assert stand_in.calls
    assert any(k > q for len_q, len_k in stand_in.calls for q, k in zip(len_q, len_k))  # cache keys


def test_gqa_rows_with_padded_keys_match_sdpa(varlen) -> None:
    """(d) `ragged_sdpa` on hand-made packed rows, 6 query heads over 2 kv heads, some keys padded."""
    gen = torch.Generator().manual_seed(2)
    lengths, key_lengths = [3, 5, 4], [3, 9, 6]
    rows, at = [], 0
    for n in lengths:
        rows.append(_Row(seq=None, spec=None, row=0, length=n, b=0, start=at))  # type: ignore[arg-type]
        at += n
    q = torch.randn(1, 6, at + 2, 8, generator=gen)  # 2 unused query slots at the end
    keys = [torch.randn(2, n, 8, generator=gen) for n in key_lengths]
    values = [torch.randn(2, n, 8, generator=gen) for n in key_lengths]
    valids = [torch.ones(n, dtype=torch.bool) for n in key_lengths]
    valids[1][:4] = False
    valids[2][-1] = False

    expected = ragged_sdpa(q, rows, keys, values, valids)
    stand_in = varlen()
    got = ragged_sdpa(q, rows, keys, values, valids)

    assert stand_in.calls == [(lengths, [3, 5, 5])]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not got[:, :, at:].any()


def test_torch_varlen_kernel_is_called_like_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's own `varlen_attn` (the kernel used where flash-attn is not installed) gets equal q/kv
    head counts (kv heads repeated: not every torch release or backend takes GQA) and only the
    arguments every release accepts; its output is returned as flash-attn's would be."""
    from torch.nn.attention import varlen as torch_varlen

    seen: list[tuple] = []
    reference = StandIn()

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):  # no keyword: the 2.10 .. 2.13 common subset
        assert q.shape[1] == k.shape[1] == v.shape[1]
        seen.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        return reference(q, k, v, cu_q, cu_k, max_q, max_k)

    monkeypatch.setattr(torch_varlen, "varlen_attn", fake_varlen_attn)
    kernel = attention.torch_varlen_func()
    assert kernel is not None
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(7, 6, 8, generator=gen)
    k, v = torch.randn(9, 2, 8, generator=gen), torch.randn(9, 2, 8, generator=gen)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)

    out = kernel(q, k, v, cu_q, cu_k, 4, 5)

    assert seen == [([0, 3, 7], [0, 4, 9], 4, 5)]
    torch.testing.assert_close(out, StandIn()(q, k, v, cu_q, cu_k, 4, 5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bidirectional"):
        kernel(q, k, v, cu_q, cu_k, 4, 5, causal=True)
