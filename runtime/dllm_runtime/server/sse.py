"""Server-sent events framing for OpenAI streaming (`data: <json>\\n\\n` ... `data: [DONE]\\n\\n`)."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One SSE `data:` event; compact JSON never contains a raw newline, so one line suffices."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
