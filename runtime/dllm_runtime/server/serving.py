"""OpenAI completions / chat completions on top of `AsyncEngine`.

One HTTP request becomes one engine request per choice (`n` x prompts). Everything a client can get
wrong is checked before the first byte of the response, so errors keep their status codes even for
streams. Client disconnects cancel the engine requests (the slot is freed at the next step):
streams through Starlette's disconnect listener cancelling the body iterator, non-streaming
requests through a watcher on the ASGI receive channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.engine.request import (
    EngineShutdownError,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
)
from dllm_runtime.server import protocol, sse
from dllm_runtime.server.errors import APIError, BadRequest, EngineFailure, NotFound, QueueFull, Unavailable
from dllm_runtime.server.model import DiffusionLMModel, Loaded, Ticket

logger = logging.getLogger("dllm_runtime.server")

#: decoder used when neither `--algorithm` nor the request names one (Dream's logits are shifted and
#: its reference sampler is its own; LLaDA-family checkpoints get DecodingParams' default)
FAMILY_ALGORITHM = {"dream": "dream"}

#: DecodingParams fields a request may set as extra body fields (max_tokens has its own field)
EXTRA_DECODING_FIELDS = tuple(n for n in DecodingParams.field_names() if n != "max_tokens")


@dataclass
class _Choice:
    index: int
    request_id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    error: str | None = None
    outputs: list[GenerationOutput] = field(default_factory=list)


@dataclass
class _Job:
    """A validated request: what to submit and how to shape the answer."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    created: int
    engine_requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    n: int = 1
    echo_prompts: list[str] | None = None


class OpenAIServing:
    """Builds engine requests from OpenAI requests and OpenAI responses from engine outputs."""

    def __init__(self, model: DiffusionLMModel, base_params: DecodingParams, algorithm_set: bool = False) -> None:
        """`algorithm_set`: the operator chose `--algorithm`; otherwise the model family's decoder is used."""
        self.model = model
        self.base_params = base_params
        self.algorithm_set = algorithm_set
        self.settings = model.settings

    def _base(self) -> DecodingParams:
        if self.algorithm_set:
            return self.base_params
        family = FAMILY_ALGORITHM.get(self.model.loaded.model_type.lower())
        return self.base_params.replace(algorithm=family) if family else self.base_params

    # ------------------------------------------------------------------ entry points
    async def completions(self, request: Request, body: bytes) -> Response:
        req = protocol.parse_request(protocol.CompletionRequest, body)
        self._check_model(req.model)
        req.checks()
        loaded = self._loaded()
        prompts = req.prompts()
        token_lists = [self._encode_prompt(p, loaded) for p in prompts]
        echo = [p if isinstance(p, str) else loaded.tokenizer.decode(p) for p in prompts] if req.echo else None
        job = self._job("completion", "cmpl", req, token_lists, req.max_tokens)
        job.echo_prompts = [e for e in echo for _ in range(req.n)] if echo else None
        return await self._run(request, job)

    async def chat(self, request: Request, body: bytes) -> Response:
        from dllm_runtime.tokenizer import TokenizerError, apply_chat_template

        req = protocol.parse_request(protocol.ChatCompletionRequest, body)
        self._check_model(req.model)
        req.checks()
        loaded = self._loaded()
        try:
            ids = apply_chat_template(loaded.tokenizer, req.chat_messages())
        except TokenizerError as exc:
            raise BadRequest(f"messages: {exc}", param="messages") from None
        job = self._job("chat", "chatcmpl", req, [ids], req.requested_max_tokens())
        return await self._run(request, job)

    # ------------------------------------------------------------------ validation
    def _loaded(self) -> Loaded:
        loaded = self.model.loaded
        if loaded is None or not self.model.ready:
            raise Unavailable("the model is not ready (loading or shutting down)", code="model_not_ready",
                              headers={"Retry-After": str(self.settings.retry_after)})
        return loaded

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _encode_prompt(self, prompt: str | list[int], loaded: Loaded) -> list[int]:
        if isinstance(prompt, str):
            ids = list(loaded.tokenizer(prompt)["input_ids"])
            if not ids:
                raise BadRequest("prompt: encodes to no tokens", param="prompt")
            return ids
        bad = next((i for i in prompt if not 0 <= i < loaded.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt: token id {bad} is outside the vocabulary [0, {loaded.vocab_size})",
                             param="prompt")
        return list(prompt)

    def _job(self, kind: str, prefix: str, req: Any, token_lists: list[list[int]], max_tokens: int | None) -> _Job:
        loaded = self.model.loaded
        s = self.settings
        param_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = s.default_max_tokens
        if max_tokens < 1:
            raise BadRequest(f"{param_name}: must be >= 1, got {max_tokens}", param=param_name)
        if max_tokens > loaded.max_model_len:
            raise BadRequest(
                f"{param_name}: {max_tokens} exceeds this model's maximum context length "
                f"({loaded.max_model_len} tokens)", param=param_name)
        for ids in token_lists:
            if len(ids) + max_tokens > loaded.max_model_len:
                where = "messages" if kind == "chat" else "prompt"
                raise BadRequest(
                    f"This model's maximum context length is {loaded.max_model_len} tokens. However, you requested "
                    f"{len(ids) + max_tokens} tokens ({len(ids)} in the {where}, {max_tokens} in the completion). "
                    f"Please reduce the length of the {where} or the completion.",
                    param=where, code="context_length_exceeded")
        total = len(token_lists) * req.n
        if total > s.max_n:
            raise BadRequest(f"n: {total} choices requested (n x prompts), the limit is {s.max_n}", param="n")
        overrides = req.decoding_overrides(EXTRA_DECODING_FIELDS)
        overrides["max_tokens"] = max_tokens
        try:
            params = DecodingParams.from_dict(overrides, base=self._base()).validate()
        except (ValueError, TypeError) as exc:
            raise _decoding_error(exc) from None
        stop = req.stop_list()
        job_id = protocol.new_id(prefix)
        requests = []
        for p, ids in enumerate(token_lists):
            for j in range(req.n):
                index = p * req.n + j
                seed = params.seed
                if seed is not None and index:
                    seed = (seed + index) % 2**63  # distinct, reproducible choices under one seed
                requests.append(GenerationRequest(
                    request_id=f"{job_id}-{index}", prompt_token_ids=ids,
                    params=params.replace(seed=seed), stop=list(stop), stream=bool(req.stream)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Job(kind, job_id, self.model.name, protocol.now(), requests, req.stream, include_usage, n=req.n)

    # ------------------------------------------------------------------ running
    async def _submit(self, job: _Job) -> list[tuple[AsyncIterator[GenerationOutput], GenerationOutput]]:
        """Admit every choice (its first output proves admission); any failure cancels the others."""
        opened = [self.model.loaded.engine.generate(greq) for greq in job.engine_requests]
        # the engine admits on the first __anext__; run them together so n choices share steps
        firsts = [asyncio.ensure_future(s.__anext__()) for s in opened]
        try:
            outputs = list(await asyncio.gather(*firsts))
        except BaseException as exc:
            # gather does not stop the siblings of a failed awaitable: cancel them (which cancels their
            # engine requests) before closing the streams, so nothing keeps decoding for nobody
            for task in firsts:
                task.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            for s in opened:
                with contextlib.suppress(Exception):
                    await s.aclose()
            if isinstance(exc, EngineShutdownError):
                raise Unavailable(f"the server is shutting down: {exc}", code="shutting_down",
                                  headers={"Retry-After": str(self.settings.retry_after)}) from None
            if isinstance(exc, QueueFullError):
                raise QueueFull(f"too many requests queued: {exc}", code="queue_full",
                                headers={"Retry-After": str(self.settings.retry_after)}) from None
            if isinstance(exc, RequestValidationError):
                raise BadRequest(str(exc), param=exc.param) from None
            raise
        return list(zip(opened, outputs))

    async def _run(self, request: Request, job: _Job) -> Response:
        ticket = self.model.admit()
        streaming = False  # once the StreamingResponse exists, it releases the ticket
        try:
            pending = asyncio.ensure_future(self._submit(job))
            if not await _race_disconnect(request, pending):
                self.model.metrics.count_error("aborted")
                return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
            streams = pending.result()
            if job.stream:
                response = self._streaming_response(job, streams, ticket)
                streaming = True
                return response
            return await self._collect(request, job, streams)
        finally:
            if not streaming:
                ticket.release()

    async def _collect(self, request: Request, job: _Job, streams) -> Response:
        choices = [_Choice(i, g.request_id) for i, g in enumerate(job.engine_requests)]

        async def drain(choice: _Choice, stream, first: GenerationOutput) -> None:
            _apply(choice, first)
            if first.finished:
                return
            async for out in stream:
                _apply(choice, out)

        gathered = asyncio.ensure_future(asyncio.gather(
            *(drain(c, s, f) for c, (s, f) in zip(choices, streams))))
        if not await _race_disconnect(request, gathered):
            # client went away: leaving the iterations cancels every engine request
            for s, _ in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()
            self.model.metrics.count_error("aborted")
            return Response(status_code=499)
        gathered.result()
        errors = [c.error for c in choices if c.finish_reason == "error"]
        if errors:
            raise EngineFailure(f"generation failed: {errors[0]}", code="engine_error")
        if any(c.finish_reason == "abort" for c in choices):
            self.model.metrics.count_error("aborted")
        return JSONResponse(self._final_body(job, choices))

    def _final_body(self, job: _Job, choices: list[_Choice]) -> dict[str, Any]:
        usage = protocol.usage(
            sum(c.prompt_tokens for c in choices[:: job.n]),  # each prompt counts once, not once per choice
            sum(c.completion_tokens for c in choices),
            sum(c.forwards for c in choices),
        )
        if job.kind == "chat":
            out_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
            obj = "chat.completion"
        else:
            out_choices = [{"index": c.index,
                            "text": (job.echo_prompts[c.index] if job.echo_prompts else "") + c.text,
                            "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
            obj = "text_completion"
        return {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                "choices": out_choices, "usage": usage}

    def _streaming_response(self, job: _Job, streams, ticket: Ticket) -> StreamingResponse:
        async def close_all() -> None:
            for s, _ in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()

        async def body() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for chunk in self._stream_events(job, streams):
                    yield chunk
                finished = True
            finally:
                if not finished:
                    self.model.metrics.count_error("aborted")
                    await close_all()
                ticket.release()

        async def after() -> None:  # runs even when the body iterator never started
            await close_all()
            ticket.release()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(after))

    async def _stream_events(self, job: _Job, streams) -> AsyncIterator[bytes]:
        choices = [_Choice(i, g.request_id) for i, g in enumerate(job.engine_requests)]
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, stream, first: GenerationOutput) -> None:
            try:
                await queue.put((i, first))
                if first.finished:
                    return
                async for out in stream:
                    await queue.put((i, out))
            except BaseException as exc:  # noqa: BLE001 - reported to the client below
                await queue.put((i, exc))

        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        usage_field = {"usage": None} if job.include_usage else {}

        def chunk(index: int, *, text: str | None = None, role: bool = False,
                  finish_reason: str | None = None) -> bytes:
            if job.kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                    delta["content"] = ""
                elif text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return sse.event({"id": job.id, "object": obj, "created": job.created, "model": job.model,
                              "choices": [choice], **usage_field})

        if job.kind == "chat":
            for c in choices:
                yield chunk(c.index, role=True)
        elif job.echo_prompts:
            for c in choices:
                yield chunk(c.index, text=job.echo_prompts[c.index])
        tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(streams)]
        try:
            remaining = len(choices)
            while remaining:
                i, item = await queue.get()
                c = choices[i]
                if isinstance(item, BaseException):
                    logger.exception("stream %s failed", c.request_id, exc_info=item)
                    item = GenerationOutput(c.request_id, finished=True, finish_reason="error", error=str(item))
                _apply(c, item)
                if item.text_delta:
                    yield chunk(i, text=item.text_delta)
                if item.finished:
                    remaining -= 1
                    if item.finish_reason == "error":
                        yield sse.event(EngineFailure(f"generation failed: {item.error}", code="engine_error").body())
                    else:
                        yield chunk(i, finish_reason=item.finish_reason)
            if job.include_usage:
                body = self._final_body(job, choices)
                yield sse.event({"id": job.id, "object": obj, "created": job.created, "model": job.model,
                                 "choices": [], "usage": body["usage"]})
            if any(c.finish_reason == "abort" for c in choices):
                self.model.metrics.count_error("aborted")
            yield sse.DONE
        finally:
            for t in tasks:
                t.cancel()


def _apply(choice: _Choice, out: GenerationOutput) -> None:
    choice.text += out.text_delta
    if out.finished:
        choice.finish_reason = out.finish_reason
        choice.prompt_tokens = out.prompt_tokens
        choice.completion_tokens = out.completion_tokens
        choice.forwards = out.nfe
        choice.error = out.error


def _decoding_error(exc: Exception) -> APIError:
    """`DecodingParams` messages start with the field name: `"steps: must be ..."`."""
    head = str(exc).split(":", 1)[0].strip()
    return BadRequest(str(exc), param=head if head.isidentifier() else None)


async def _race_disconnect(request: Request, work: asyncio.Future) -> bool:
    """Wait for `work`; False (and `work` cancelled) when the client disconnects first."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return True
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    return False


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
