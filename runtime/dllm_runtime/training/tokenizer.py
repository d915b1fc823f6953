"""Train a small byte-level BPE tokenizer with LLaDA's special tokens and chat template.

The folder it writes (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) loads
offline with `transformers.AutoTokenizer.from_pretrained`, exactly like a released LLaDA checkpoint's:
same special-token strings, same Llama-3 style jinja template (copied in spirit from
GSAI-ML/LLaDA-8B-Instruct's tokenizer_config.json), `add_bos_token: false` (the template adds BOS).
Special tokens get the ids right after the BPE vocabulary, as in LLaDA (126080+), so the mask id
is the same kind of "late" id the decoders see on a real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"

#: Order in which the special tokens are appended after the BPE vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, MASK, START_HEADER, END_HEADER, EOT)

#: LLaDA-8B-Instruct's chat template (Llama-3 style; BOS before the first message, the assistant
#: header is always appended as the generation prompt).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


@dataclass(frozen=True)
class TokenizerIds:
    """Ids of the special tokens in a trained tokenizer (what config.json must agree with)."""

    bos: int
    eos: int
    mask: int
    eot: int
    start_header: int
    end_header: int
    vocab_size: int


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, split_digits: bool = False) -> Tokenizer:
    """Byte-level BPE over `texts` with `vocab_size` ids in total (BPE pieces + special tokens).

    GPT-2's pre-tokenisation keeps a number together with its leading space (" 48"), so frequent
    numbers become one token. `split_digits=True` (Llama/Qwen style) was tried first and hurt a
    model this small: the lone space before every number and the digit "0" became the most
    frequent tokens, and an under-trained masked-diffusion model then fills canvases with them.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256 + 16:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need > {256 + 16 + len(SPECIAL_TOKENS)})")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        # Too little text to learn n_bpe merges: pad nothing, just make the layout explicit.
        raise ValueError(f"corpus only supports {tok.get_vocab_size()} BPE pieces, asked for {n_bpe}; lower vocab_size")
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids n_bpe .. vocab_size-1, in SPECIAL_TOKENS order
    return tok


def special_ids(tok: Tokenizer) -> TokenizerIds:
    """Resolve the special ids by string, never by position."""

    def tid(s: str) -> int:
        i = tok.token_to_id(s)
        if i is None:
            raise ValueError(f"tokenizer has no special token {s!r}")
        return i

    return TokenizerIds(
        bos=tid(BOS), eos=tid(EOS), mask=tid(MASK), eot=tid(EOT),
        start_header=tid(START_HEADER), end_header=tid(END_HEADER), vocab_size=tok.get_vocab_size(),
    )


def save_hf_tokenizer(tok: Tokenizer, folder: Path) -> TokenizerIds:
    """Write a transformers-loadable tokenizer folder with LLaDA's tokenizer_config layout."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    ids = special_ids(tok)
    added = {
        str(tok.token_to_id(s)): {
            "content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for s in SPECIAL_TOKENS
    }
    extra = [MASK, START_HEADER, END_HEADER, EOT]
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def entry(s: str) -> dict[str, object]:
        return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    smap = {"additional_special_tokens": extra, "bos_token": entry(BOS), "eos_token": entry(EOS), "pad_token": entry(EOS)}
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    return ids
