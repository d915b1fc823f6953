"""GSM8K as masked-diffusion training data: LLaDA-style SFT rows plus plain "pre-training" rows.

Every row has the same length `seq_len` (no padding mask at all, exactly like LLaDA's SFT, which
pads answers with EOS and trains on the pads so the model learns to end): an SFT row is
`chat_template(question) + answer + <|eot_id|> + <|endoftext|>*`, with the prompt never masked; a
plain row is `<|startoftext|> question \\n answer <|endoftext|>*`, masked anywhere after BOS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations, e.g. "<<48/2=24>>"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def clean_answer(answer: str) -> str:
    """Drop GSM8K's `<<a*b=c>>` calculator annotations; keep the `#### N` final-answer line."""
    return _CALC.sub("", answer).strip()


def load_gsm8k(path: Path, limit: int | None = None) -> list[QA]:
    """Read GSM8K jsonl (`question`, `answer`), cleaning the answers."""
    rows: list[QA] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            rows.append(QA(d["question"].strip(), clean_answer(d["answer"])))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"no GSM8K rows in {path}")
    return rows


def corpus_texts(rows: list[QA]) -> Iterator[str]:
    """Text the BPE tokenizer is trained on."""
    for r in rows:
        yield r.question
        yield r.answer


@dataclass(frozen=True)
class Rows:
    """A tokenised dataset: `ids` `(N, seq_len)`, `maskable` `(N, seq_len)` bool (positions the
    objective may mask), `content` `(N, seq_len)` bool (maskable and not EOS padding, for metrics)."""

    ids: torch.Tensor
    maskable: torch.Tensor
    content: torch.Tensor
    dropped: int  # rows longer than seq_len, left out


def build_rows(rows: list[QA], tokenizer, seq_len: int, plain_every: int = 0) -> Rows:
    """Tokenise `rows` into fixed-length training rows.

    `tokenizer` is a transformers tokenizer with the LLaDA chat template. With `plain_every = k > 0`
    every k-th row is a plain pre-training row instead of a chat (SFT) row.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ids_l, mk_l, ct_l = [], [], []
    dropped = 0
    for n, r in enumerate(rows):
        answer = tokenizer.encode(r.answer, add_special_tokens=False)
        if plain_every and n % plain_every == plain_every - 1:
            prefix = [bos]
            body = tokenizer.encode(r.question + "\n", add_special_tokens=False) + answer
            maskable_from = 1
        else:
            prefix = _chat_prompt(tokenizer, r.question)
            body = answer + [eot]
            maskable_from = len(prefix)
        seq = prefix + body
        if len(seq) + 1 > seq_len:  # keep at least one EOS so every row teaches "stop"
            dropped += 1
            continue
        content_end = len(seq)
        seq = seq + [eos] * (seq_len - len(seq))
        pos = torch.arange(seq_len)
        ids_l.append(torch.tensor(seq, dtype=torch.long))
        mk_l.append(pos >= maskable_from)
        ct_l.append((pos >= maskable_from) & (pos < content_end))
    if not ids_l:
        raise ValueError(f"every row is longer than seq_len={seq_len}")
    return Rows(torch.stack(ids_l), torch.stack(mk_l), torch.stack(ct_l), dropped)


def _chat_prompt(tokenizer, question: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


_WORD = re.compile(r"[A-Za-z]+")


def corpus_words(rows: list[QA]) -> set[str]:
    """Lower-cased alphabetic words of the questions and answers (the demo model's "dictionary")."""
    words: set[str] = set()
    for r in rows:
        words.update(w.lower() for w in _WORD.findall(r.question))
        words.update(w.lower() for w in _WORD.findall(r.answer))
    return words


def known_word_share(text: str, words: set[str]) -> tuple[float, int]:
    """Share of the alphabetic words of `text` found in `words`, and how many words there were.

    A cheap, model-free fluency signal: a random-weight model glues BPE pieces into non-words,
    a trained one mostly emits words it has seen.
    """
    found = [w.lower() for w in _WORD.findall(text)]
    if not found:
        return 0.0, 0
    return sum(w in words for w in found) / len(found), len(found)
