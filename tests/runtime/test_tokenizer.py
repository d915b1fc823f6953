"""Tokenizers and chat templates from the shared stand-in folders (real special ids and templates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dllm_runtime.tokenizer import (
    TokenizerError,
    apply_chat_template,
    load_tokenizer,
    render_chat,
    resolve_special_ids,
)
from tests.helpers.tiny_models import TOKENIZERS

LLADA_TOK = TOKENIZERS / "llada-standin"
DREAM_TOK = TOKENIZERS / "dream-v0-instruct-7b"


@pytest.fixture(scope="module")
def llada_tok():
    return load_tokenizer(LLADA_TOK)


@pytest.fixture(scope="module")
def dream_tok():
    return load_tokenizer(DREAM_TOK)


def test_llada_chat_template_renders_llama3_style(llada_tok):
    text = render_chat(llada_tok, [{"role": "user", "content": "  What is 7*6?  "}])
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
    # content is trimmed, the turn ends with <|eot_id|>, the generation prompt is the assistant header
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 7*6?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llada_chat_ids_start_with_bos_once(llada_tok):
    ids = apply_chat_template(llada_tok, [{"role": "user", "content": "hi"}])
    bos = llada_tok.convert_tokens_to_ids("<|startoftext|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert llada_tok.convert_tokens_to_ids("<|eot_id|>") in ids
    assert llada_tok.decode(ids) == render_chat(llada_tok, [{"role": "user", "content": "hi"}])


def test_dream_chat_template_adds_default_system_prompt(dream_tok):
    text = render_chat(dream_tok, [{"role": "user", "content": "Hello"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = render_chat(dream_tok, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert "You are a helpful assistant." not in custom and custom.startswith("<|im_start|>system\nBe terse.")
    no_prompt = render_chat(dream_tok, [{"role": "user", "content": "Hello"}], add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_dream_chat_ids_round_trip(dream_tok):
    msgs = [{"role": "user", "content": "Count: 1 2 3"}]
    ids = apply_chat_template(dream_tok, msgs)
    assert ids[0] == dream_tok.convert_tokens_to_ids("<|im_start|>")
    assert dream_tok.decode(ids) == render_chat(dream_tok, msgs)


def test_special_ids_from_loaded_tokenizer_match_folder_files(llada_tok, dream_tok):
    """The two lookup paths (loaded tokenizer / raw JSON files) agree, and ids are the real ones."""
    llada_cfg = json.loads((TOKENIZERS / "llada-8b-instruct" / "config.json").read_text())
    from_tok = resolve_special_ids(llada_cfg, tokenizer=llada_tok)
    from_files = resolve_special_ids(llada_cfg, model_dir=LLADA_TOK)
    assert from_tok == from_files
    assert from_tok.mask == llada_cfg["mask_token_id"] and from_tok.eos == llada_cfg["eos_token_id"]
    assert from_tok.eot == llada_tok.convert_tokens_to_ids("<|eot_id|>")
    assert from_tok.bos == llada_tok.convert_tokens_to_ids("<|startoftext|>")

    dream_cfg = {"eos_token_id": 151643, "pad_token_id": 151643}  # no mask/bos in config: from tokenizer
    d_tok = resolve_special_ids(dream_cfg, tokenizer=dream_tok)
    assert d_tok == resolve_special_ids(dream_cfg, model_dir=DREAM_TOK)
    assert d_tok.mask == dream_tok.convert_tokens_to_ids("<|mask|>")
    assert d_tok.eot == dream_tok.convert_tokens_to_ids("<|im_end|>")
    assert d_tok.bos == dream_tok.convert_tokens_to_ids("<|beginoftext|>")
    assert d_tok.stop_ids() == (151643, d_tok.eot)


def test_special_ids_precedence_and_errors(tmp_path):
    # config wins over generation_config, which wins over tokenizer files; eos lists take the first
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": 8}))
    ids = resolve_special_ids({"mask_token_id": 3, "eos_token_id": [5, 6], "bos_token_id": 4}, model_dir=tmp_path)
    assert (ids.mask, ids.eos, ids.pad, ids.bos, ids.eot) == (3, 5, 5, 4, None)
    ids = resolve_special_ids({"mask_token_id": 3}, model_dir=tmp_path)
    assert (ids.eos, ids.bos) == (8, 7)
    with pytest.raises(ValueError, match="mask token id"):
        resolve_special_ids({"eos_token_id": 1})
    with pytest.raises(ValueError, match="EOS token id"):
        resolve_special_ids({"mask_token_id": 1})
    with pytest.raises(ValueError, match="must differ"):
        resolve_special_ids({"mask_token_id": 1, "eos_token_id": 2, "pad_token_id": 1})


def test_missing_template_and_bad_folder_are_clear(tmp_path, llada_tok):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    folder = tmp_path / "no-template"
    shutil.copytree(LLADA_TOK, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(load_tokenizer(folder), [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="messages must not be empty"):
        apply_chat_template(llada_tok, [])


def test_tiny_model_dirs_carry_a_working_tokenizer(tiny_llada_dir: Path, tiny_dream_dir: Path):
    for folder in (tiny_llada_dir, tiny_dream_dir):
        tok = load_tokenizer(folder)
        cfg = json.loads((folder / "config.json").read_text())
        ids = apply_chat_template(tok, [{"role": "user", "content": "2+2?"}])
        assert max(ids) < cfg.get("embedding_size", cfg["vocab_size"])
        assert resolve_special_ids(cfg, tokenizer=tok) == resolve_special_ids(cfg, model_dir=folder)
