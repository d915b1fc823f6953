"""The built-in demo model (runtime/dllm_runtime/demo_model) and the code that trains it.

The committed model is exercised through the serving path only (load_model, load_tokenizer,
registry.build_policy, engine.step.run_to_completion). Quality is asserted as measurable properties
that a broken or untrained model fails: the share of generated words that are real (GSM8K) words,
compared against the same architecture with random weights, and tokens per forward under
Fast-dLLM confidence-threshold decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_runtime.commands.generate import completion_tokens
from dllm_runtime.decoding.base import RandomSource, Sequence
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.demo import DemoModelMissingError, check_model_folder, demo_model_path
from dllm_runtime.engine.step import run_to_completion
from dllm_runtime.models import LLaDAModel, load_model
from dllm_runtime.tokenizer import apply_chat_template, load_tokenizer
from dllm_runtime.training import data as D
from dllm_runtime.training import tokenizer as T
from dllm_runtime.training.objective import MaskedBatch, certainty_loss, diffusion_loss, mask_tokens, sample_t

ROOT = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = ROOT / "data" / "gsm8k_train.jsonl"
GSM8K_TEST = ROOT / "data" / "gsm8k_test.jsonl"


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared by many test runs: one torch thread is faster and does not oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def model(demo_dir: Path) -> LLaDAModel:
    return load_model(demo_dir, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path):
    return load_tokenizer(demo_dir)


@pytest.fixture(scope="module")
def train_words() -> set[str]:
    return D.corpus_words(D.load_gsm8k(GSM8K_TRAIN))


def _decode(model, tokenizer, questions: list[str], params: DecodingParams) -> list[tuple[str, int, int]]:
    """(answer text, answer tokens, NFE) per question, decoded as one batch by the step loop."""
    special = model.special_ids
    batch = []
    for q in questions:
        prompt = apply_chat_template(tokenizer, [{"role": "user", "content": q}])
        canvas = torch.full((1, len(prompt) + params.generation_slots()), special.mask, dtype=torch.long)
        canvas[0, : len(prompt)] = torch.tensor(prompt)
        seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=special, rng=RandomSource(0))
        batch.append((seq, build_policy(params, model)))
    run_to_completion(model, batch)
    out = []
    for seq, _ in batch:
        gen = seq.canvas[0, seq.prompt_len :].tolist()
        assert special.mask not in gen, "decoding finished with masked slots left"
        toks, _ = completion_tokens(gen, special, params.max_tokens)
        out.append((tokenizer.decode(toks, skip_special_tokens=True), len(toks), seq.nfe))
    return out


# ---------------------------------------------------------------------------- the committed folder
def test_folder_is_a_normal_llada_checkpoint(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "llada"
    assert config["architectures"] == ["LLaDAModelLM"]
    assert "auto_map" not in config, "no remote code ships with the demo model"
    for name in ("generation_config.json", "special_tokens_map.json", "README.md"):
        assert (demo_dir / name).is_file(), name
    size = sum(f.stat().st_size for f in demo_dir.iterdir() if f.is_file())
    assert size <= 30 * 2**20, f"demo model folder is {size / 2**20:.1f} MiB (limit 30)"


def test_missing_folder_error_names_the_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DemoModelMissingError, match="model.safetensors") as err:
        check_model_folder(tmp_path)
    assert "--model" in str(err.value)


def test_tokenizer_loads_offline_with_llada_special_tokens(demo_dir: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(demo_dir), local_files_only=True)
    text = "Natalia sold 48 clips in April."
    assert auto.decode(auto.encode(text, add_special_tokens=False)) == text
    config = json.loads((demo_dir / "config.json").read_text())
    assert auto.convert_tokens_to_ids("<|mdm_mask|>") == config["mask_token_id"]
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == config["eos_token_id"]
    rendered = auto.apply_chat_template([{"role": "user", "content": " Hi "}], tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # every special token is one id, never split into byte pieces
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    assert ids[0] == auto.bos_token_id and ids[-1] != auto.unk_token_id


def test_loads_in_saved_dtype_and_float32(demo_dir: Path, model: LLaDAModel) -> None:
    from safetensors import safe_open

    config = json.loads((demo_dir / "config.json").read_text())
    auto = load_model(demo_dir)  # --dtype auto: config.json's torch_dtype (fp32, fast on CPU)
    assert next(auto.parameters()).dtype == getattr(torch, config["torch_dtype"])
    with safe_open(str(demo_dir / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor(next(iter(f.keys()))).dtype
    native = load_model(demo_dir, dtype=stored)  # the file's own dtype (bf16) also loads and runs on CPU
    assert next(native.parameters()).dtype == stored
    ids = model.special_ids
    assert (ids.mask, ids.eos) == (config["mask_token_id"], config["eos_token_id"])
    assert ids.eot is not None and ids.bos is not None and ids.eot != ids.eos
    x = torch.tensor([[ids.bos, 10, 20, 30, ids.mask, ids.mask]])
    pos = model.position_ids(torch.ones_like(x, dtype=torch.bool))
    ref = model(x, pos)
    low = native(x, pos).float()
    assert torch.isfinite(low).all()
    # the saved dtype computes the same predictions, up to its rounding
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert torch.allclose(torch.softmax(low, -1), torch.softmax(ref, -1), atol=0.05)


# ---------------------------------------------------------------------------- generation quality
def test_answers_gsm8k_questions_in_real_words(model, tokenizer, train_words: set[str]) -> None:
    questions = [q.question for q in D.load_gsm8k(GSM8K_TEST, limit=3)]
    params = DecodingParams(algorithm="fast_dllm", threshold=0.9, max_tokens=128, block_length=32, steps=128)
    texts = [text for text, _, _ in _decode(model, tokenizer, questions, params)]
    share, n_words = D.known_word_share(" ".join(texts), train_words)
    assert n_words >= 15, f"too few words to judge: {texts!r}"
    assert share >= 0.85, f"only {share:.0%} real words: {texts!r}"
    # it learned GSM8K's answer format: most answers end with the "#### N" line
    assert sum("####" in t for t in texts) >= 2, f"answers lack GSM8K's final-answer line: {texts!r}"

    # the metric discriminates: the same architecture with random weights emits mostly non-words
    torch.manual_seed(0)
    untrained = LLaDAModel(model.config, model.special_ids).eval()
    for p in untrained.parameters():
        torch.nn.init.normal_(p, std=0.5)
    junk = " ".join(text for text, _, _ in _decode(untrained, tokenizer, questions, params))
    junk_share, junk_words = D.known_word_share(junk, train_words)
    assert junk_words == 0 or junk_share < share - 0.3, f"random weights score {junk_share:.0%}: {junk!r}"


def test_threshold_decoding_commits_several_tokens_per_forward(model, tokenizer) -> None:
    """Fast-dLLM's confidence threshold commits clearly more than one token per forward.

    The training's certainty-forcing phase makes the model sure where it is right (measured 1.38
    slots per forward at 0.9 and 2.10 at 0.7 on these 3 prompts at 128 slots, 1.39 / 2.20 on 50 in
    the model card; 1.13 / 1.19 here without that phase); a lower threshold must buy fewer forwards.
    """
    questions = [q.question for q in D.load_gsm8k(GSM8K_TEST, limit=3)]
    slots_per_forward = {}
    for threshold in (0.9, 0.7):
        params = DecodingParams(algorithm="fast_dllm", threshold=threshold, max_tokens=128, block_length=32, steps=128)
        results = _decode(model, tokenizer, questions, params)
        assert all(r[1] > 0 for r in results), "every prompt gets a non-empty answer"
        slots_per_forward[threshold] = params.generation_slots() * len(questions) / sum(r[2] for r in results)
    assert slots_per_forward[0.9] > 1.25, slots_per_forward
    assert slots_per_forward[0.7] > slots_per_forward[0.9] * 1.2, slots_per_forward


# ---------------------------------------------------------------------------- training code
def test_masking_respects_maskable_and_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(4000).reshape(4, 1000) % 50
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :100] = False  # the prompt of an SFT row
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    mb = mask_tokens(ids, maskable, mask_id=99, t=t, generator=gen)
    assert not mb.masked[:, :100].any()
    assert (mb.noisy[mb.masked] == 99).all() and (mb.noisy[~mb.masked] == ids[~mb.masked]).all()
    rate = mb.masked[:, 100:].float().mean(1)
    assert torch.allclose(rate, mb.p_mask, atol=0.06)
    ts = sample_t(64, gen)
    assert ts.min() > 0 and ts.max() <= 1
    assert torch.histc(ts, bins=4, min=0, max=1).min() >= 15  # stratified: every quarter is hit


def test_diffusion_loss_is_the_weighted_masked_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 7, (2, 5), generator=gen)
    masked = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    maskable = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    batch = MaskedBatch(noisy=target, masked=masked, p_mask=torch.tensor([0.5, 0.25]))
    logits = torch.randn(2, 5, 7, generator=gen)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    expected = ((ce[0, 0] + ce[0, 2]) / 0.5 / 5 + (ce[1, 1] + ce[1, 2] + ce[1, 3]) / 0.25 / 3) / 2
    got = diffusion_loss(logits[masked], target, batch, maskable)
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError, match="masked positions"):
        diffusion_loss(logits[0, :2], target, batch, maskable)


def test_certainty_loss_sharpens_only_correct_predictions() -> None:
    """dParallel's certainty forcing: the entropy of right answers, nothing from wrong ones."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]], requires_grad=True)
    target = torch.tensor([0, 2, 2])  # rows 0 and 2 are right, row 1 is wrong
    p = torch.softmax(logits.detach(), -1)
    entropy = -(p * p.log()).sum(-1)
    loss = certainty_loss(logits, target)
    assert torch.allclose(loss, (entropy[0] + entropy[2]) / 2)
    loss.backward()
    assert logits.grad[1].abs().max() == 0  # a confident mistake is not rewarded
    # a gradient step makes the correct rows more confident in their answer
    sharper = torch.softmax(logits.detach() - 1.0 * logits.grad, -1)
    assert sharper[0, 0] > p[0, 0] and sharper[2, 2] > p[2, 2]
    assert certainty_loss(logits.detach(), torch.tensor([1, 0, 0])) == 0  # nothing right: no term


def test_tokenizer_builder_and_sft_rows(tmp_path: Path) -> None:
    rows = D.load_gsm8k(GSM8K_TRAIN, limit=300)
    assert "<<" not in rows[0].answer and rows[0].answer.endswith("#### 72")
    tok = T.train_bpe(D.corpus_texts(rows), vocab_size=512)
    ids = T.save_hf_tokenizer(tok, tmp_path)
    assert ids.vocab_size == 512 and min(ids.bos, ids.eos, ids.mask, ids.eot) == 512 - len(T.SPECIAL_TOKENS)
    hf = load_tokenizer(tmp_path)
    built = D.build_rows(rows[:20], hf, seq_len=256, plain_every=4)
    n = built.ids.shape[0]
    assert n + built.dropped == 20 and built.ids.shape[1] == 256
    sft = built.ids[0]
    prompt_len = int((~built.maskable[0]).sum())
    assert sft[0] == ids.bos and sft[prompt_len - 1] != ids.eot  # prompt ends with the assistant header
    content_end = int(built.content[0].nonzero().max()) + 1
    assert sft[content_end - 1] == ids.eot and (sft[content_end:] == ids.eos).all()
    plain = built.ids[3]  # every 4th row is plain text: BOS, no chat header, maskable after BOS
    assert plain[0] == ids.bos and plain[1] != ids.start_header and built.maskable[3, 1:].all()
    with pytest.raises(ValueError, match="too small"):
        T.train_bpe(["a b c"], vocab_size=100)
