"""A real (if minimal) byte-level tokenizer for the golden tiny models (vocab 256).

Ids below `num_bytes` are UTF-8 bytes, the rest are special tokens. Decoding splits multi-byte
characters across tokens exactly like byte-level BPE does, which is what the engine's incremental
detokenizer must handle; the golden tiny models' special ids (248..252) stay special.
"""

from __future__ import annotations

from typing import Sequence


class ByteTokenizer:
    def __init__(self, num_bytes: int = 248) -> None:
        self.num_bytes = num_bytes

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if any(b >= self.num_bytes for b in data):
            raise ValueError("text has bytes outside this tokenizer's range")
        return list(data)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **_: object) -> str:
        out = bytearray()
        for i in ids:
            if i < self.num_bytes:
                out.append(i)
            elif not skip_special_tokens:
                out += f"<special_{i}>".encode()
        return out.decode("utf-8", errors="replace")
