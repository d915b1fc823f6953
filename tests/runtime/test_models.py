"""Native LLaDA / Dream forwards against the golden logits of the reference modeling code (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from dllm_runtime.models import DreamModel, LLaDAModel, SpecialIds, load_model
from dllm_runtime.models.attention import KeyMaskAttention, sdpa
from dllm_runtime.models.layers import RMSNorm, Rotary
from tests.runtime.golden_replay import golden_cases, golden_tensors, one_thread, tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
#: Trace logits (canvas length 40) were taken inside the reference decoders; at other sequence
#: lengths CPU GEMM blocking changes fp32 rounding by a few 1e-5 (a float64 forward differs from
#: both by ~1e-4), so trace checks use a relative bound and also compare the argmax that decoders use.
TRACE_ATOL, TRACE_RTOL = 2e-4, 1e-5


@pytest.fixture(scope="module")
def llada() -> LLaDAModel:
    """dtype and special ids as the loader reads them from the golden config (checked below)."""
    return tiny_model("llada_tiny", dtype=None, special_ids=None)


@pytest.fixture(scope="module")
def dream() -> DreamModel:
    return tiny_model("dream_tiny", dtype=None, special_ids=None)


@pytest.fixture(scope="module")
def llada_tensors() -> dict[str, torch.Tensor]:
    return golden_tensors("llada")


@pytest.fixture(scope="module")
def dream_tensors() -> dict[str, torch.Tensor]:
    return golden_tensors("dream")


def _forward(model, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    attention = None if bool(valid.all()) else KeyMaskAttention(valid)
    with torch.inference_mode():
        return model(ids, model.position_ids(valid), attention)


def test_model_attributes(llada, dream):
    assert (llada.model_type, llada.shift_logits, llada.num_layers) == ("llada", False, 2)
    assert (llada.num_kv_heads, llada.head_dim, llada.vocab_size) == (4, 16, 256)
    assert (dream.model_type, dream.shift_logits, dream.num_layers) == ("Dream", True, 2)
    assert (dream.num_kv_heads, dream.head_dim, dream.vocab_size) == (2, 16, 256)
    # special ids come from the golden configs (§4.2 table), not from literals in the code
    assert (llada.special_ids.mask, llada.special_ids.eos, llada.special_ids.eot, llada.special_ids.bos) == (250, 251, 252, 248)
    assert (dream.special_ids.mask, dream.special_ids.pad, dream.special_ids.eot, dream.special_ids.bos) == (250, 251, 252, 248)


def test_llada_forward_matches_golden(llada, llada_tensors):
    ids = llada_tensors["forward/input_ids"]
    torch.testing.assert_close(_forward(llada, ids), llada_tensors["forward/logits"], atol=ATOL, rtol=0)


def test_llada_forward_with_key_mask_matches_golden(llada, llada_tensors):
    ids, mask = llada_tensors["forward/input_ids"], llada_tensors["forward/attention_mask"]
    assert not bool(mask.all()), "golden mask should contain pads"
    got = _forward(llada, ids, mask)
    torch.testing.assert_close(got, llada_tensors["forward/logits_with_mask"], atol=ATOL, rtol=0)
    # and the mask really changes the result (the check above is not vacuous)
    assert (got - llada_tensors["forward/logits"]).abs().max() > 1e-3


def test_dream_forward_matches_golden_unshifted(dream, dream_tensors):
    ids = dream_tensors["forward/input_ids"]
    torch.testing.assert_close(_forward(dream, ids), dream_tensors["forward/logits_unshifted"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "case, steps",
    [("llada_lowconf_semiar_t0", (0, 7, 15)), ("llada_batch2_leftpad_t0", (0, 9)), ("llada_cfg1.5_t0", (3,))],
)
def test_llada_trace_forwards(llada, llada_tensors, case, steps):
    c = golden_cases("llada")[case]
    mask = c["kwargs"].get("attention_mask")
    for i in steps:
        ids = torch.tensor(c["trace"][i]["input_ids"])
        valid = torch.ones_like(ids, dtype=torch.bool)
        if mask is not None:  # prompt mask, generated region always valid; CFG doubles the batch
            m = torch.tensor(mask, dtype=torch.bool)
            m = m.repeat(ids.shape[0] // m.shape[0], 1)
            valid[:, : m.shape[1]] = m
        want = llada_tensors[c["trace"][i]["logits_key"]]
        got = _forward(llada, ids, valid)
        torch.testing.assert_close(got, want, atol=TRACE_ATOL, rtol=TRACE_RTOL)
        _assert_same_argmax(got, want, ids == llada.special_ids.mask)


@pytest.mark.parametrize("case, steps", [("dream_entropy_t0", (0, 8, 15)), ("dream_entropy_batch2_leftpad_t0", (0, 11))])
def test_dream_trace_forwards(dream, dream_tensors, case, steps):
    c = golden_cases("dream")[case]
    for i in steps:
        ids = torch.tensor(c["trace"][i]["input_ids"])
        valid = torch.ones_like(ids, dtype=torch.bool)
        if c["attention_mask"] is not None:
            am = torch.tensor(c["attention_mask"], dtype=torch.bool)
            valid[:, : am.shape[1]] = am
        got = _forward(dream, ids, valid)
        want = dream_tensors[c["trace"][i]["logits_key"]]
        # pad query rows are never read by the sampler (the reference leaves them NaN or zero)
        torch.testing.assert_close(got[valid], want[valid], atol=TRACE_ATOL, rtol=TRACE_RTOL)
        _assert_same_argmax(got, want, valid)
        assert torch.isfinite(got).all(), "pad rows must not produce NaN"


def _assert_same_argmax(got: torch.Tensor, want: torch.Tensor, where: torch.Tensor) -> None:
    """Predicted tokens agree wherever the top-2 gap exceeds the numeric noise."""
    top2 = want.topk(2, dim=-1).values
    clear = where & ((top2[..., 0] - top2[..., 1]) > 1e-3)
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_position_ids():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    llada = LLaDAModel.__new__(LLaDAModel)
    dream = DreamModel.__new__(DreamModel)
    assert LLaDAModel.position_ids(llada, valid).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert DreamModel.position_ids(dream, valid).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


class _Recorder:
    """An attention context that records what the model hands to it and defers to plain SDPA."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple, tuple]] = []

    def attend(self, layer, q, k, v):
        self.calls.append((layer, tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_attention_context_gets_every_layer_with_unrepeated_kv_heads(arch, llada, dream):
    model = llada if arch == "llada" else dream
    ids = torch.randint(0, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    rec = _Recorder()
    with torch.inference_mode():
        got = model(ids, model.position_ids(torch.ones_like(ids, dtype=torch.bool)), rec)
    hq = 4
    assert [c[0] for c in rec.calls] == list(range(model.num_layers))
    assert all(c[1] == (2, hq, 5, model.head_dim) and c[2] == (2, model.num_kv_heads, 5, model.head_dim) for c in rec.calls)
    torch.testing.assert_close(got, _forward(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_padded_batch_equals_single_rows(arch, llada, dream):
    """Pad-and-mask batching (what the engine does) does not change any valid row's logits."""
    model = llada if arch == "llada" else dream
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 240, (1, 9), generator=gen), torch.randint(0, 240, (1, 5), generator=gen)
    ids = torch.full((2, 9), model.special_ids.pad)
    ids[0], ids[1, :5] = a[0], b[0]
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[0], valid[1, :5] = True, True
    with torch.inference_mode():
        pos = torch.stack([model.position_ids(valid[:1])[0], model.position_ids(torch.ones(1, 9, dtype=torch.bool))[0]])
        batched = model(ids, pos, KeyMaskAttention(valid))
    torch.testing.assert_close(batched[0], _forward(model, a)[0], atol=TRACE_ATOL, rtol=TRACE_RTOL)
    torch.testing.assert_close(batched[1, :5], _forward(model, b)[0], atol=TRACE_ATOL, rtol=TRACE_RTOL)


def test_rope_positions_change_logits(llada):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        base = llada(ids, torch.arange(4)[None])
        shifted = llada(ids, torch.arange(4)[None] + 3)
        # a uniform shift preserves relative positions: bidirectional attention is translation invariant
        torch.testing.assert_close(base, shifted, atol=1e-4, rtol=0)
        swapped = llada(ids, torch.tensor([[0, 2, 1, 3]]))
    assert (base - swapped).abs().max() > 1e-3


@pytest.mark.parametrize("full_precision", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_identical_to_the_references_rotate_half(full_precision: bool, dtype: torch.dtype) -> None:
    """`Rotary` uses roll + a pre-signed sin table and rotates q and k heads together, token-major; it must
    equal the HF `x*cos + rotate_half(x)*sin` on each of them bit for bit."""
    rotary = Rotary(64, 500000.0, full_precision)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4096, (3, 50), generator=gen)
    q, k = torch.randn(3, 4, 50, 64, generator=gen).to(dtype), torch.randn(3, 2, 50, 64, generator=gen).to(dtype)
    freqs = positions.float()[..., None] * rotary.inv_freq(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]

    def reference(x: torch.Tensor) -> torch.Tensor:
        cos, sin = emb.cos(), emb.sin()
        if full_precision:
            x32 = x.float()
        else:
            x32, cos, sin = x, cos.to(x.dtype), sin.to(x.dtype)
        half = x.shape[-1] // 2
        return (x32 * cos + torch.cat([-x32[..., half:], x32[..., :half]], dim=-1) * sin).type_as(x)

    rotated = rotary(torch.cat([q, k], dim=1).transpose(1, 2), rotary.cos_sin(positions, dtype)).transpose(1, 2)
    assert torch.equal(rotated[:, :4], reference(q)) and torch.equal(rotated[:, 4:], reference(k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [16, 64, 896, 4096])
def test_rms_norm_is_bit_identical_to_the_references(dtype: torch.dtype, width: int) -> None:
    """`RMSNorm` computes its fp32 part with `F.rms_norm` (one kernel on a GPU); on a CPU it must equal the
    released modeling code's `w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)` bit for bit."""
    gen = torch.Generator().manual_seed(width)
    norm = RMSNorm(width, 1e-5)
    norm.weight.data = torch.randn(width, generator=gen).to(dtype)
    x = (3 * torch.randn(2, 37, width, generator=gen)).to(dtype)
    x32 = x.float()
    reference = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), reference)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_bf16_forward_close_to_fp32(arch):
    """The bf16 path (what GPUs run) stays close to fp32; catches dtype mix-ups in norm/RoPE."""
    stem = "llada_tiny" if arch == "llada" else "dream_tiny"
    fp32 = tiny_model(stem, dtype="float32", special_ids=None)
    bf16 = tiny_model(stem, dtype="bfloat16", special_ids=None)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[248, 17, 99, 3, 42, 120, 7, 230, 250, 250]])
    want, got = _forward(fp32, ids), _forward(bf16, ids)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()) < 0.05
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.7


def test_tiny_model_dirs_load_with_real_special_ids(tiny_llada_dir, tiny_dream_dir):
    llada = load_model(tiny_llada_dir)
    assert isinstance(llada, LLaDAModel)
    assert (llada.special_ids.mask, llada.special_ids.eos, llada.special_ids.eot, llada.special_ids.bos) == (
        126336, 126081, 126348, 126080,
    )  # fmt: skip
    dream = load_model(tiny_dream_dir)
    assert isinstance(dream, DreamModel)
    assert (dream.special_ids.mask, dream.special_ids.eos, dream.special_ids.eot) == (151666, 151643, 151645)
    for model in (llada, dream):
        ids = torch.tensor([[model.special_ids.bos, 100, 200, model.special_ids.mask]])
        logits = _forward(model, ids)
        assert logits.shape == (1, 4, model.vocab_size) and torch.isfinite(logits).all()


def test_released_llada_8b_config_builds_released_tensor_layout():
    """The real LLaDA-8B-Instruct config.json (shared copy) maps to the §2.1 tensor names and shapes."""
    from dllm_runtime.models.llada import LLaDAConfig
    from dllm_runtime.tokenizer import resolve_special_ids
    from tests.helpers.tiny_models import TOKENIZERS

    cfg = json.loads((TOKENIZERS / "llada-8b-instruct" / "config.json").read_text())
    ids = resolve_special_ids(cfg, model_dir=TOKENIZERS / "llada-8b-instruct")
    assert (ids.mask, ids.eos, ids.eot, ids.bos) == (126336, 126081, 126348, 126080)
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(cfg), ids)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.transformer.wte.weight"] == (126464, 4096)
    assert shapes["model.transformer.ff_out.weight"] == (126464, 4096)
    assert shapes["model.transformer.blocks.31.q_proj.weight"] == (4096, 4096)
    assert shapes["model.transformer.blocks.0.ff_proj.weight"] == (12288, 4096)
    assert shapes["model.transformer.blocks.0.ff_out.weight"] == (4096, 12288)
    assert len(shapes) == 3 + 32 * 9
    assert 8.0e9 < sum(v.numel() for v in model.state_dict().values()) < 8.1e9


def test_dream_7b_config_builds_released_tensor_layout():
    """Dream-v0-Instruct-7B sizes (§2.2): GQA 28/4 heads, q/k/v bias, untied lm_head."""
    from dllm_runtime.models.dream import DreamConfig

    cfg = {"model_type": "Dream", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu"}  # fmt: skip
    with torch.device("meta"):
        model = DreamModel(DreamConfig.from_dict(cfg), SpecialIds(mask=151666, eos=151643, pad=151643))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (512,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert shapes["lm_head.weight"] == (152064, 3584) and shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert len(shapes) == 3 + 28 * 12
    assert 7.5e9 < sum(v.numel() for v in model.state_dict().values()) < 7.7e9
