"""Incremental detokenization of the finalised prefix, with stop strings.

A diffusion step can finalise many tokens at once and anywhere on the canvas; only the committed
left-to-right prefix is final, so that is what is decoded. Each update re-decodes the whole prefix
(one Rust `decode` of at most `max_model_len` ids, only when the prefix grew) instead of vLLM's
windowed offsets: it is exact for every tokenizer family (SentencePiece leading spaces, byte-level
BPE) and costs microseconds at serving lengths.

What is held back until later tokens settle it:
* trailing U+FFFD: an incomplete multi-byte character whose remaining bytes are in later tokens;
* a trailing piece of text that is a prefix of a stop string: the stop string may complete next
  step, and then that text must never have been sent.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], **kwargs) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's growing finalised token prefix into text/token deltas."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # emitted so far
        self.token_ids: list[int] = []  # emitted so far
        self.stopped = False  # a stop string was found: the output is complete
        self._seen = 0  # length of the prefix last decoded

    def _decode(self, ids: Sequence[int]) -> str:
        # no clean-up of tokenization spaces: it rewrites earlier text when later tokens arrive
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def update(self, prefix: Sequence[int], final: bool = False) -> tuple[str, list[int]]:
        """Feed the whole finalised prefix (without EOS); returns the new (text, token ids) to emit.

        `final=True` flushes everything that was held back (the request is ending).
        """
        if self.stopped or (len(prefix) == self._seen and not final):
            return "", []
        self._seen = len(prefix)
        text = self._decode(prefix)
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            return self._emit(text[:hit], list(prefix[: self._tokens_until_stop(prefix)]))
        if final:
            return self._emit(text, list(prefix))
        return self._emit(text[: self._safe_len(text)], list(prefix))

    # ------------------------------------------------------------------ helpers
    def _emit(self, text: str, ids: list[int]) -> tuple[str, list[int]]:
        # Emitted text is never retracted: if a tokenizer ever rewrote already-sent text, the stream
        # continues after the sent length (clean_up_tokenization_spaces=False avoids the known case).
        delta = text[len(self.text) :]
        self.text += delta
        new_ids = ids[len(self.token_ids) :]
        self.token_ids.extend(new_ids)
        return delta, new_ids

    def _find_stop(self, text: str) -> int | None:
        """Index of the earliest stop-string occurrence at or after already-emitted text."""
        if not self.stop:
            return None
        # a stop string cannot end inside emitted text (it was checked then), but may start in it
        start = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _tokens_until_stop(self, prefix: Sequence[int]) -> int:
        """Fewest prefix tokens whose text contains a stop string (binary search; usage counts them)."""
        lo, hi = len(self.token_ids), len(prefix)  # decode(prefix[:lo]) has no stop, prefix[:hi] has
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._find_stop(self._decode(prefix[:mid])) is not None:
                hi = mid
            else:
                lo = mid
        return hi

    def _safe_len(self, text: str) -> int:
        """Length of `text` that no later token or stop string can change."""
        end = len(text)
        while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        hold = 0  # the longest tail that could still grow into a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        return max(end - hold, len(self.text))
