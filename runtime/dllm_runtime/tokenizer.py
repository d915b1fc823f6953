"""Tokenizers, chat templates and special-id resolution for model folders.

Everything is read from the model folder itself (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, `generation_config.json`): no hub access, no remote code. Special ids are
resolved in exactly one place (`resolve_special_ids`) so decoders never see literals.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dllm_runtime.models.base import SpecialIds

#: Token strings that carry an end-of-turn / mask meaning in the supported families, in lookup order.
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>")
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>")


class TokenizerError(ValueError):
    """A tokenizer folder or chat request that cannot be used (missing files, no chat template)."""


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the folder's fast tokenizer with `transformers.AutoTokenizer`, local files only."""
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer_config.json")
    try:
        # AutoTokenizer also reads config.json and warns that it does not know `llada`/`Dream`;
        # only the tokenizer is wanted here, so that noise is silenced.
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError ...)
        raise TokenizerError(f"{folder}: cannot load tokenizer: {exc}") from exc


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt string produced by the folder's own jinja chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model's tokenizer has no chat template; use the completions API instead")
    if not messages:
        raise TokenizerError("messages must not be empty")
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 TemplateError and friends: a client-side mistake in messages
        raise TokenizerError(f"cannot render chat template: {exc}") from exc


def apply_chat_template(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the rendered chat prompt.

    The templates already emit BOS (LLaDA) or start with `<|im_start|>` (Dream), so encoding does
    not add special tokens a second time.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def resolve_special_ids(
    config: Mapping[str, Any],
    tokenizer: Any | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> SpecialIds:
    """Mask, EOS, pad, EoT/`<|im_end|>` and BOS ids for a model.

    Sources in order: `config.json` fields (`mask_token_id`, `eos_token_id`, ...), the golden
    configs' `_golden_note`, `generation_config.json`, then the tokenizer (a loaded one, or the
    tokenizer files in `model_dir`). Raises `ValueError` naming what is missing or inconsistent.
    """
    note = config.get("_golden_note") or {}
    gen = _read_json(Path(model_dir) / "generation_config.json") if model_dir else {}
    lookup = _TokenLookup(tokenizer, Path(model_dir) if model_dir else None)

    mask = _first(config.get("mask_token_id"), note.get("mask"), lambda: lookup.ids(MASK_TOKENS), lambda: lookup.named("mask_token"))
    eos = _first(config.get("eos_token_id"), note.get("eos"), gen.get("eos_token_id"), lambda: lookup.named("eos_token"))
    pad = _first(config.get("pad_token_id"), note.get("pad"), gen.get("pad_token_id"), lambda: lookup.named("pad_token"), eos)
    eot = _first(config.get("eot_token_id"), note.get("eot"), note.get("im_end"), lambda: lookup.ids(EOT_TOKENS))
    bos = _first(config.get("bos_token_id"), note.get("bos"), gen.get("bos_token_id"), lambda: lookup.named("bos_token"))
    if mask is None:
        raise ValueError("cannot resolve the mask token id: no mask_token_id in config.json and no mask token in the tokenizer")
    if eos is None:
        raise ValueError("cannot resolve the EOS token id: no eos_token_id in config.json / generation_config.json / tokenizer")
    if mask in (eos, pad):
        raise ValueError(f"mask token id {mask} must differ from eos ({eos}) and pad ({pad})")
    return SpecialIds(mask=mask, eos=eos, pad=pad, eot=eot, bos=bos)


def _first(*candidates: Any) -> int | None:
    """First usable id; callables are evaluated lazily (tokenizer lookups are the expensive part).

    HF configs may store `eos_token_id` as a list: its first element is taken.
    """
    for c in candidates:
        if callable(c):
            c = c()
        if isinstance(c, list):
            c = c[0] if c else None
        if isinstance(c, bool) or c is None:
            continue
        if isinstance(c, int):
            return c
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _added_tokens(path: Path) -> list[dict[str, Any]]:
    """`added_tokens` of a `tokenizer.json` without decoding its (multi-MB) vocabulary.

    The list sits near the top of the file; only that JSON value is decoded. Falls back to a full
    parse if the layout is unusual.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    key = text.find('"added_tokens"')
    start = text.find("[", key) if key >= 0 else -1
    if start >= 0 and text[key + len('"added_tokens"') : start].strip() == ":":
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
            if isinstance(value, list):
                return value
        except json.JSONDecodeError:
            pass
    data = json.loads(text)
    return data.get("added_tokens", []) if isinstance(data, dict) else []


class _TokenLookup:
    """Token string → id from a loaded tokenizer or, without one, from the folder's JSON files."""

    def __init__(self, tokenizer: Any | None, folder: Path | None) -> None:
        self.tokenizer = tokenizer
        self.folder = folder
        self._vocab: dict[str, int] | None = None
        self._names: dict[str, str] | None = None

    def id_of(self, token: str | None) -> int | None:
        if not token:
            return None
        if self.tokenizer is not None:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            return None if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token) else int(tid)
        return self._file_vocab().get(token)

    def ids(self, tokens: Sequence[str]) -> int | None:
        for t in tokens:
            tid = self.id_of(t)
            if tid is not None:
                return tid
        return None

    def named(self, attr: str) -> int | None:
        """Id of a named special token (`bos_token`, `eos_token`, `pad_token`, `mask_token`)."""
        if self.tokenizer is not None:
            return self.id_of(getattr(self.tokenizer, attr, None))
        return self.id_of(self._file_names().get(attr))

    def _file_vocab(self) -> dict[str, int]:
        """Added (special) tokens: the small `tokenizer_config.json` first, `tokenizer.json` after."""
        if self._vocab is None:
            vocab: dict[str, int] = {}
            if self.folder is not None:
                decoder = _read_json(self.folder / "tokenizer_config.json").get("added_tokens_decoder", {})
                for tid, entry in decoder.items():
                    vocab[entry["content"]] = int(tid)
                if not vocab:
                    for entry in _added_tokens(self.folder / "tokenizer.json"):
                        vocab[entry["content"]] = int(entry["id"])
            self._vocab = vocab
        return self._vocab

    def _file_names(self) -> dict[str, str]:
        if self._names is None:
            names: dict[str, str] = {}
            if self.folder is not None:
                for fname in ("special_tokens_map.json", "tokenizer_config.json"):
                    data = _read_json(self.folder / fname)
                    for key in ("bos_token", "eos_token", "pad_token", "mask_token"):
                        value = data.get(key)
                        if isinstance(value, dict):
                            value = value.get("content")
                        if isinstance(value, str) and key not in names:
                            names[key] = value
            self._names = names
        return self._names
