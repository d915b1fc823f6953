"""OpenAI request types (pydantic, strict) and the response/chunk shapes we send.

Requests are validated in strict mode straight from the JSON bytes, so `"max_tokens": "5"` is a 400
rather than a silent coercion. Diffusion settings ride along as extra body fields (what vLLM and the
`openai` client's `extra_body` do); any extra field that is not a `DecodingParams` field is rejected,
so a typo never silently falls back to a default. Responses are plain dicts in OpenAI's shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dllm_runtime.server.errors import BadRequest

#: request fields that map 1:1 onto DecodingParams (besides the diffusion extras)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral values are supported by diffusion decoding
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # diffusion extras (typed here so a wrong type is a 400 naming the field)
    algorithm: str | None = None
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    factor: float | None = None
    cache: str | None = None
    cfg_scale: float | None = None
    alg: str | None = None
    alg_temp: float | None = None
    eps: float | None = None
    block_add_threshold: float | None = None
    decoded_token_threshold: float | None = None
    cache_delay_iter: int | None = None
    cache_refresh_interval: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(s == "" for s in stops):
            raise BadRequest("stop: stop strings must be non-empty", param="stop")
        return stops

    def common_checks(self) -> None:
        """Checks pydantic cannot express; each error names its field."""
        if self.n < 1:
            raise BadRequest(f"n: must be >= 1, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options: only allowed when stream is true", param="stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise BadRequest(f"{name}: not supported by diffusion decoding (only 0)", param=name)
        if self.logit_bias:
            raise BadRequest("logit_bias: not supported by diffusion decoding", param="logit_bias")

    def decoding_overrides(self, extra_names: tuple[str, ...]) -> dict[str, Any]:
        """Sampling and diffusion settings the request set (None = server default)."""
        values: dict[str, Any] = {}
        for name in SAMPLING_FIELDS + DIFFUSION_FIELDS:
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        for name, value in (self.model_extra or {}).items():
            if name not in extra_names:
                raise BadRequest(f"{name}: unrecognized request argument", param=name)
            if value is not None:
                values[name] = value
        return values


DIFFUSION_FIELDS = (
    "algorithm", "steps", "block_length", "remasking", "threshold", "factor", "cache", "cfg_scale",
    "alg", "alg_temp", "eps", "block_add_threshold", "decoded_token_threshold", "cache_delay_iter",
    "cache_refresh_interval",
)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def checks(self) -> None:
        self.common_checks()
        if self.logprobs is not None:
            raise BadRequest("logprobs: not supported by diffusion decoding", param="logprobs")
        if self.best_of not in (None, self.n):
            raise BadRequest("best_of: only best_of == n is supported", param="best_of")
        if self.suffix:
            raise BadRequest("suffix: not supported", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: text or token ids per prompt; never empty."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and isinstance(p[0], int):
            items = [list(p)]  # type: ignore[arg-type]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise BadRequest("prompt: must not be empty", param="prompt")
        for item in items:
            if len(item) == 0:
                raise BadRequest("prompt: must not be empty", param="prompt")
        return items


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # `name`, `tool_call_id`… are harmless

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def checks(self) -> None:
        self.common_checks()
        if not self.messages:
            raise BadRequest("messages: must contain at least one message", param="messages")
        if not any(m.text() for m in self.messages):
            raise BadRequest("messages: all messages are empty", param="messages")
        if self.logprobs or self.top_logprobs:
            raise BadRequest("logprobs: not supported by diffusion decoding", param="logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise BadRequest("tools: tool calling is not supported", param="tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise BadRequest("max_completion_tokens: conflicts with max_tokens", param="max_completion_tokens")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate JSON bytes strictly; any problem is a 400 naming the field."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise _bad_request(exc) from None


def _bad_request(exc: ValidationError) -> BadRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return BadRequest(f"Invalid JSON body: {first['msg'].removeprefix('Invalid JSON: ')}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return BadRequest("Request body must be a JSON object", code="invalid_json")
    field = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        where = ".".join(str(p) for p in first["loc"])
        return BadRequest(f"{where}: unrecognized field", param=field)
    if first["type"] == "missing":
        return BadRequest(f"{field}: field required", param=field)
    # unions report one error per member; show the field and the distinct messages
    same_field = [e for e in errors if e["loc"] and str(e["loc"][0]) == field]
    messages = list(dict.fromkeys(e["msg"] for e in same_field))[:3]
    return BadRequest(f"{field}: {'; '.join(messages)}", param=field)


# ---------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, forwards: int) -> dict[str, Any]:
    """OpenAI usage plus diffusion statistics (`forwards` = model evaluations, NFE)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "diffusion": {
            "forwards": forwards,
            "tokens_per_forward": round(completion_tokens / forwards, 4) if forwards else 0.0,
        },
    }


def model_card(name: str, created: int, max_model_len: int | None, root: str) -> dict[str, Any]:
    """One entry of GET /v1/models, vLLM's shape (`max_model_len`, `root`); `max_model_len` is None
    (JSON null, as vLLM's optional field allows) while the model is still loading."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "dllm-serve",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
    }

