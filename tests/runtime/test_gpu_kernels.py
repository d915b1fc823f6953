"""The GPU kernels of the step loop (attention, fused RMSNorm), on a real CUDA device (issue #7).

Skipped where there is no CUDA GPU (CI, laptops): these run on a GPU machine only, with
`python -m pytest tests/runtime/test_gpu_kernels.py`. The CPU suite checks the same paths with a
stand-in kernel (`test_varlen_attention.py`); here the real varlen FlashAttention (flash-attn's, else
PyTorch's own) computes, and its logits must agree with the per-group SDPA path within bf16 noise.
"""

from __future__ import annotations

import pytest
import torch

from dllm_runtime.decoding.base import ForwardSpec, RandomSource, Sequence
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine import step
from dllm_runtime.models import load_model_files
from dllm_runtime.models.base import DiffusionModel
from tests.runtime.golden_replay import GOLDEN, TINY_SPECIAL, random_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")


def cuda_model(name: str) -> DiffusionModel:
    config, weights = GOLDEN / f"{name}_config.json", GOLDEN / f"{name}.safetensors"
    return load_model_files(config, [weights], dtype="bfloat16", device="cuda", special_ids=TINY_SPECIAL).eval()


def to_cuda(item: tuple[Sequence, ForwardSpec]) -> tuple[Sequence, ForwardSpec]:
    seq, spec = item
    for name in ("input_ids", "positions", "valid", "logits_at"):
        value = getattr(spec, name)
        if value is not None:
            setattr(spec, name, value.cuda())
    seq.canvas = seq.canvas.cuda()
    return seq, spec


@pytest.mark.parametrize("model_name", ["llada_tiny", "dream_tiny"])  # dream_tiny: GQA (4 q, 2 kv heads)
def test_varlen_kernel_matches_sdpa_groups(model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = cuda_model(model_name)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 1, 0), (17, 2, 0), (30, 1, 3), (40, 1, 0)]  # (length, rows, left pad): a packed batch
    work = [to_cuda(random_spec(model, gen, n, rows, pad)) for n, rows, pad in shapes]
    q = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16, device="cuda")
    assert step.use_varlen(q), "no varlen kernel on this GPU (flash-attn, or torch >= 2.10)"
    with torch.inference_mode():
        got = step.batched_forward(model, work)
        monkeypatch.setattr(step, "use_varlen", lambda q: False)
        expected = step.batched_forward(model, work)
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.25)  # bf16 logits of ~10-90


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_decode_runs_on_the_varlen_kernel(cache: str) -> None:
    """Fast-dLLM with a KV cache, next to a request without one, through the real step loop on the GPU:
    every canvas is fully decoded and the varlen kernel's logits stay finite."""
    model = cuda_model("llada_tiny")
    common = dict(algorithm="fast_dllm", max_tokens=16, block_length=8, threshold=0.7)
    batch = []
    for n, params in [(7, DecodingParams(cache=cache, **common)), (12, DecodingParams(**common))]:
        canvas = torch.full((1, n + 16), model.special_ids.mask, dtype=torch.long, device="cuda")
        canvas[0, :n] = torch.randint(0, 248, (n,))
        seq = Sequence(canvas=canvas, prompt_len=n, special=model.special_ids, rng=RandomSource(0, "cuda"))
        batch.append((seq, build_policy(params, model)))
    step.run_to_completion(model, batch)
    for seq, _ in batch:
        assert not (seq.canvas[0, seq.prompt_len :] == model.special_ids.mask).any()
        assert 0 < seq.nfe <= 16


@pytest.mark.parametrize(("dtype", "one_step"), [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_rms_norm_accumulates_half_input_in_fp32(dtype: torch.dtype, one_step: float) -> None:
    """`RMSNorm` hands half-precision activations straight to `F.rms_norm` (one fused kernel): the kernel
    must upcast as the released code does (`x.float()`, normalise, cast back), so at most one rounding
    step apart from that route, at LLaDA-8B's width."""
    from dllm_runtime.models.layers import RMSNorm

    norm = RMSNorm(4096, 1e-5).to("cuda", dtype)  # weight ones: the normalised values themselves
    x = (3 * torch.randn(4, 300, 4096, device="cuda")).to(dtype)
    with torch.inference_mode():
        got = norm(x)
        reference = torch.nn.functional.rms_norm(x.float(), (4096,), eps=1e-5).to(dtype)
    assert got.dtype == dtype
    # computing in the half type instead misses by more (checked on a CPU with the same inputs)
    torch.testing.assert_close(got.float(), reference.float(), rtol=one_step, atol=0)
