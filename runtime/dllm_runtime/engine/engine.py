"""`AsyncEngine`: continuous batching of diffusion sequences at step granularity.

Threading model. The event loop (the server) only submits, cancels and reads: `generate` validates
and enqueues a request, then awaits its per-request `asyncio.Queue`; it never touches the device. One
worker thread owns the model, the device and every `Sequence`; it loops: apply cancellations, admit
waiting requests (`Scheduler`) and lay out their canvases, run one batched forward over every running
sequence (`engine.step.run_step`, the same loop the conformance runner uses), then turn each
sequence's newly finalised prefix into a `GenerationOutput` and hand the step's outputs to their
`OutputSink` in one call per sink: for `generate`, one `loop.call_soon_threadsafe` per event loop.
The loop is never blocked by a forward; the worker never touches asyncio objects except through that
call. `engine.process` runs this same engine in a child process and submits with a sink that writes
each step's outputs to its pipe.

Shared state (waiting queue, cancel set, counters) is guarded by one lock held only for
bookkeeping, never across a forward.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

import torch

from dllm_runtime.decoding.base import DecodingPolicy, RandomSource, Sequence, generation_ids
from dllm_runtime.engine.config import EngineConfig
from dllm_runtime.engine.detokenizer import IncrementalDetokenizer
from dllm_runtime.engine.request import (
    EngineShutdownError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestValidationError,
)
from dllm_runtime.engine.scheduler import Footprint, Scheduler, estimate_cache_bytes
from dllm_runtime.engine.stats import EngineObserver, EngineStats, RequestStats, StepStats, notify
from dllm_runtime.engine.step import run_step
from dllm_runtime.models.base import DiffusionModel

if TYPE_CHECKING:
    from dllm_runtime.decoding.params import DecodingParams

logger = logging.getLogger(__name__)

PolicyFactory = Callable[["DecodingParams", DiffusionModel], DecodingPolicy]


class OutputSink(Protocol):
    """Where the outputs of the requests submitted with it go (`AsyncEngine.submit`).

    `send` runs on the engine's worker thread, once per step with every output of that step for this
    sink's requests, each next to the queue its request was submitted with; it must not block on the
    consumer. Raising `RuntimeError` says nobody listens any more: the unfinished requests are cancelled.
    Sinks are compared by value, so equal sinks share one `send` per step.
    """

    def send(self, outputs: list[tuple[asyncio.Queue | None, GenerationOutput]]) -> None: ...


@dataclass(frozen=True)
class LoopSink:
    """`generate`'s sink: one wake-up of the consumers' event loop per step, which puts each output
    in its request's `asyncio.Queue`."""

    loop: asyncio.AbstractEventLoop

    def send(self, outputs: list[tuple[asyncio.Queue | None, GenerationOutput]]) -> None:
        self.loop.call_soon_threadsafe(_deliver, outputs)

_NEW, _RUNNING, _DRAINING, _STOPPED = "new", "running", "draining", "stopped"


@dataclass(eq=False)  # identity semantics: cancel sets hold the object, not its (reusable) id
class _Tracked:
    """Engine-side state of one request, from submission to its final output."""

    request: GenerationRequest
    prompt: list[int]
    policy: DecodingPolicy
    footprint: Footprint
    detok: IncrementalDetokenizer
    sink: OutputSink
    queue: asyncio.Queue | None  # handed back to the sink with each output (`generate` reads it)
    arrival: float
    max_tokens: int
    slots: int  # generation slots on the canvas
    ignore_eos: bool = False  # vLLM's ignore_eos: EOS/EoT do not end the answer
    seq: Sequence | None = None  # made by the worker at admission (`AsyncEngine._start`)
    first_step: float | None = None
    first_token: float | None = None
    steps: int = 0
    prefix_seen: int = 0  # finalised-prefix length already read from the canvas
    answer: list[int] = field(default_factory=list)  # the finalised answer tokens, cut at a stop id
    error: str | None = None
    done: bool = False  # final output handed to the loop
    running: bool = False
    masked: int = -1  # masked slots on the canvas after the last step (-1: not counted yet)


class AsyncEngine:
    """One model, one device, one worker thread; many concurrent requests in one batch per step."""

    def __init__(
        self,
        model: DiffusionModel,
        tokenizer: Any,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        *,
        policy_factory: PolicyFactory | None = None,
    ) -> None:
        """`policy_factory(params, model)` defaults to `decoding.registry.build_policy` (a seam for
        custom decoders and for tests that inject a failing policy)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.config.validate()
        self.observer = observer
        self._policy_factory = policy_factory
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self._element_size = param.element_size() if param is not None else 4
        self._min_tokens = self.config.resolved_min_forward_tokens(self.device)
        self._stop_ids = frozenset(model.special_ids.stop_ids())

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._scheduler: Scheduler[_Tracked] = Scheduler(self.config)
        self._by_id: dict[str, _Tracked] = {}  # waiting + running, under the lock
        self._cancelled: set[_Tracked] = set()  # under the lock
        self._state = _NEW
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._running: list[_Tracked] = []  # worker thread only
        self._outbox: dict[OutputSink, list[tuple[_Tracked, GenerationOutput]]] | None = None
        # counters (written by the worker under the lock, read by stats())
        self._total_steps = 0
        self._total_forwards = 0
        self._total_committed = 0
        self._total_finished = 0
        self._cache_bytes = 0
        self._last_step_latency = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._state != _NEW:
                return
            self._state = _RUNNING
        self._thread = threading.Thread(target=self._worker, name="dllm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish within `timeout` s, then abort the rest."""
        if self._begin_shutdown(timeout):
            await asyncio.to_thread(self._thread.join)  # type: ignore[union-attr]

    def stop(self, timeout: float = 30.0) -> None:
        """`shutdown` for a caller without an event loop (the engine process's main thread): blocks."""
        if self._begin_shutdown(timeout):
            self._thread.join()  # type: ignore[union-attr]

    def _begin_shutdown(self, timeout: float) -> bool:
        """Start draining; True when there is a worker thread to wait for."""
        with self._wakeup:
            if self._state == _NEW:
                self._state = _STOPPED
                return False
            if self._state == _RUNNING:
                self._state = _DRAINING
                self._deadline = time.monotonic() + max(0.0, timeout)
            self._wakeup.notify_all()
        return self._thread is not None

    @property
    def is_running(self) -> bool:
        """True while the engine accepts requests (the server's readiness can use it)."""
        return self._state == _RUNNING

    # ------------------------------------------------------------------ public API
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Submit `request` and stream its outputs; the last one has `finished=True`.

        Raises (before the first output) `RequestValidationError` when the request can never be
        served as asked and `QueueFullError` when the waiting queue is full or the engine is
        shutting down. Leaving the iteration early (a client disconnect, task cancellation)
        cancels the request: it leaves the batch at the next step.
        """
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        tracked = self._submit(request, LoopSink(asyncio.get_running_loop()), queue)
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if not tracked.done:
                self._cancel(tracked)

    def submit(self, request: GenerationRequest, sink: OutputSink, queue: asyncio.Queue | None = None) -> None:
        """Validate and enqueue `request` now; its outputs go to `sink` (with `queue`), the last with
        `finished=True`. Raises what `generate` raises. Thread-safe: the engine process calls it from
        the thread that reads its pipe."""
        self._submit(request, sink, queue)

    def cancel(self, request_id: str) -> None:
        """Abort a request (thread-safe; unknown or finished ids are ignored)."""
        with self._lock:
            tracked = self._by_id.get(request_id)
        if tracked is not None:
            self._cancel(tracked)

    def stats(self) -> EngineStats:
        """A consistent snapshot for metrics and health checks (any thread)."""
        with self._lock:
            running = self._scheduler.num_running
            return EngineStats(
                num_running=running,
                num_waiting=self._scheduler.num_waiting,
                max_num_seqs=self.config.max_num_seqs,
                batch_occupancy=running / self.config.max_num_seqs,
                total_steps=self._total_steps,
                total_forwards=self._total_forwards,
                total_tokens_committed=self._total_committed,
                total_requests_finished=self._total_finished,
                cache_bytes=self._cache_bytes,
                reserved_cache_bytes=self._scheduler.reserved_cache_bytes,
                max_cache_bytes=self.config.max_cache_bytes,
                last_step_latency_s=self._last_step_latency,
            )

    # ------------------------------------------------------------------ submission (event loop)
    def _submit(self, request: GenerationRequest, sink: OutputSink, queue: asyncio.Queue | None) -> _Tracked:
        if self._state != _RUNNING:
            raise EngineShutdownError(
                "the engine is not running" if self._state == _NEW else "the engine is shutting down"
            )
        prompt = self._check_prompt(request.prompt_token_ids)
        stop = request.stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestValidationError("stop: must be a list of strings", "stop")
        params = request.params
        try:
            params.validate()
            slots = params.generation_slots()
        except ValueError as exc:
            raise RequestValidationError(str(exc), _param_of(exc)) from None
        canvas_len = len(prompt) + slots
        if canvas_len > self.config.max_model_len:
            param = "prompt" if len(prompt) >= self.config.max_model_len else "max_tokens"
            raise RequestValidationError(
                f"{param}: this model's maximum context length is {self.config.max_model_len} tokens, but the "
                f"request needs {canvas_len} ({len(prompt)} prompt + {slots} generation slots for "
                f"max_tokens={params.max_tokens}); reduce the prompt or max_tokens",
                param,
            )
        rows = 2 if params.cfg_scale > 0 else 1
        cache = 0
        if params.cache != "none":
            cache = estimate_cache_bytes(
                rows=rows,
                canvas=canvas_len,
                num_layers=self.model.num_layers,
                num_kv_heads=self.model.num_kv_heads,
                head_dim=self.model.head_dim,
                element_size=self._element_size,
            )
        footprint = Footprint(rows=rows, canvas=canvas_len, cache_bytes=cache)
        self._scheduler.check_fits(footprint)

        try:
            factory = self._policy_factory
            if factory is None:
                from dllm_runtime.decoding.registry import build_policy as factory  # decoders load lazily
            policy = factory(params, self.model)
        except ValueError as exc:
            raise RequestValidationError(str(exc), _param_of(exc)) from None

        tracked = _Tracked(
            request=request,
            prompt=prompt,
            policy=policy,
            footprint=footprint,
            detok=IncrementalDetokenizer(self.tokenizer, stop),
            sink=sink,
            queue=queue,
            arrival=time.monotonic(),
            max_tokens=params.max_tokens,
            slots=slots,
            ignore_eos=params.ignore_eos,
        )
        with self._wakeup:
            if self._state != _RUNNING:
                raise EngineShutdownError("the engine is shutting down")
            if request.request_id in self._by_id:
                raise RequestValidationError(
                    f"request_id: {request.request_id!r} is already in flight", "request_id"
                )
            self._scheduler.enqueue(tracked, footprint)  # QueueFullError when full
            self._by_id[request.request_id] = tracked
            self._wakeup.notify_all()
        return tracked

    def _check_prompt(self, ids: Any) -> list[int]:
        try:
            prompt = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise RequestValidationError("prompt: token ids must be integers", "prompt") from None
        if not prompt:
            raise RequestValidationError("prompt: must contain at least one token", "prompt")
        vocab = self.model.vocab_size
        bad = next((i for i in prompt if not 0 <= i < vocab), None)
        if bad is not None:
            raise RequestValidationError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        if self.model.special_ids.mask in prompt:
            raise RequestValidationError(
                f"prompt: contains the mask token id {self.model.special_ids.mask}, which would be denoised", "prompt"
            )
        return prompt

    def _cancel(self, tracked: _Tracked) -> None:
        with self._wakeup:
            if not tracked.done:
                self._cancelled.add(tracked)
                self._wakeup.notify_all()

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        try:
            while self._loop_once():
                pass
            with self._lock:
                self._state = _STOPPED
        except BaseException:  # a bug in the engine itself: fail everything loudly, never hang clients
            logger.exception("engine worker crashed")
            self._abort_all("error", "internal engine error")
            with self._lock:
                self._state = _STOPPED
            raise

    def _loop_once(self) -> bool:
        """One iteration: bookkeeping, then one step. Returns False when the worker should exit."""
        with self._wakeup:
            while not (self._running or self._scheduler.num_waiting or self._cancelled) and self._state == _RUNNING:
                self._wakeup.wait()
            cancelled, self._cancelled = self._cancelled, set()
            expired = self._state == _DRAINING and time.monotonic() >= (self._deadline or 0.0)
            dropped = self._scheduler.remove_waiting(lambda t: t in cancelled)
            admitted = [] if expired else self._scheduler.admit()
            idle = not (self._running or admitted or self._scheduler.num_waiting)
        for tracked in dropped:
            self._finish(tracked, "abort", "cancelled")
        for tracked in [t for t in self._running if t in cancelled]:
            self._finish(tracked, "abort", "cancelled")
        if expired:
            self._abort_all("abort", "engine shut down before the request finished")
            return False
        if idle:
            return self._state == _RUNNING
        now = time.monotonic()
        for tracked in admitted:
            tracked.running = True
            tracked.first_step = now
            self._running.append(tracked)
            try:
                self._start(tracked)
            except Exception as exc:  # the policy's own start-up: this request only
                logger.exception("request %s failed to start", tracked.request.request_id)
                self._finish(tracked, "error", f"{type(exc).__name__}: {exc}")
        if self._running:
            self._step()
        return True

    def _start(self, tracked: _Tracked) -> None:
        """The device side of admission: the request's canvas, generator and policy state.

        Here on the worker, not in `generate`: on a GPU a host-to-device copy or a read-back on the
        event loop would wait for the forward in flight (one stream), stalling every other client
        for up to a step. What can be refused (params, lengths, the policy's settings) was checked
        at submission; a policy whose `init` still raises fails this request alone.
        """
        special = self.model.special_ids
        canvas = torch.tensor([tracked.prompt + [special.mask] * tracked.slots], dtype=torch.long, device=self.device)
        tracked.seq = Sequence(
            canvas=canvas,
            prompt_len=len(tracked.prompt),
            special=special,
            rng=RandomSource(tracked.request.params.seed, self.device),
        )
        tracked.policy.init(tracked.seq)

    def _step(self) -> None:
        start = time.perf_counter()
        batch = [(t.seq, t.policy) for t in self._running]
        by_seq = {id(t.seq): t for t in self._running}
        fresh = [t for t in self._running if t.masked < 0]
        for t, gen in zip(fresh, generation_ids([t.seq for t in fresh])):
            t.masked = gen.count(t.seq.special.mask)
        self._outbox = {}

        def on_error(seq: Sequence, exc: Exception) -> None:
            tracked = by_seq[id(seq)]
            tracked.error = f"{type(exc).__name__}: {exc}"
            logger.warning("request %s failed: %s", tracked.request.request_id, tracked.error)

        committed = 0
        try:
            result = run_step(self.model, batch, on_error=on_error, min_tokens=self._min_tokens)
            running = list(self._running)
            for tracked, gen in zip(running, generation_ids([t.seq for t in running])):
                tracked.steps += 1
                masked = gen.count(tracked.seq.special.mask)
                committed += tracked.masked - masked
                tracked.masked = masked
                try:
                    self._advance(tracked, gen, gen.index(tracked.seq.special.mask) if masked else len(gen))
                except Exception as exc:  # e.g. a tokenizer that cannot decode: this request only
                    logger.exception("request %s failed after its step", tracked.request.request_id)
                    self._finish(tracked, "error", f"{type(exc).__name__}: {exc}")
        finally:
            self._flush_outbox()
        latency = time.perf_counter() - start
        cache = sum(t.seq.cache_bytes() for t in self._running)
        with self._lock:
            self._total_steps += 1
            self._total_forwards += 1 if result.sequences else 0
            self._total_committed += committed
            self._cache_bytes = cache
            self._last_step_latency = latency
            num_running, num_waiting = self._scheduler.num_running, self._scheduler.num_waiting
        if result.sequences:
            self._observe(
                "on_step",
                StepStats(
                    batch_size=result.sequences,
                    tokens_in_forward=result.tokens,
                    tokens_committed=committed,
                    latency_s=latency,
                    cache_bytes=cache,
                    num_running=num_running,
                    num_waiting=num_waiting,
                ),
            )

    def _advance(self, tracked: _Tracked, gen: list[int], prefix_len: int) -> None:
        """After a step: emit the newly finalised text, and finish the request when it is done.

        `gen`: the sequence's generation slots; `prefix_len`: how many are final, left to right (up
        to the first still-masked slot). The answer so far is kept as a list, extended by new ones.
        """
        if tracked.error is not None:
            self._finish(tracked, "error", tracked.error)
            return
        seq = tracked.seq
        prefix_len = tracked.max_tokens if seq.finished else min(prefix_len, tracked.max_tokens)
        reason: FinishReason | None = None
        new: list[int] = []
        if prefix_len > tracked.prefix_seen:
            new = gen[tracked.prefix_seen : prefix_len]
            tracked.prefix_seen = prefix_len
            if seq.finished:
                # the policy may end with slots still masked (e.g. a dual-cache run out of steps): keep
                # what was decoded, drop the holes
                new = [t for t in new if t != seq.special.mask]
            # early stop: EOS/EoT inside the finalised prefix ends the answer, the rest of the canvas is moot
            stops = [] if tracked.ignore_eos else [i for i, t in enumerate(new) if t in self._stop_ids]
            if stops:
                new, reason = new[: stops[0]], "stop"
            tracked.answer.extend(new)
        if reason is None and (prefix_len >= tracked.max_tokens or seq.finished):
            reason = "length"
        if reason is None and not new:
            return  # nothing newly finalised this step
        text, ids = tracked.detok.update(tracked.answer, final=reason is not None)
        if tracked.detok.stopped:
            reason = "stop"
        if reason is not None:
            self._finish(tracked, reason, None, text, ids)
        elif text or ids:
            self._emit(tracked, GenerationOutput(tracked.request.request_id, text, ids, nfe=seq.nfe))

    def _finish(
        self,
        tracked: _Tracked,
        reason: FinishReason,
        error: str | None,
        text: str = "",
        ids: list[int] | None = None,
    ) -> None:
        """Final output, free the sequence's cache and reservation, report its statistics."""
        if tracked.done:
            return
        now = time.monotonic()
        seq = tracked.seq
        nfe = 0 if seq is None else seq.nfe
        if seq is not None:
            seq.finished = True
            seq.kv = None  # free the block KV cache now, not when the last reference goes
        # bookkeeping before the final output, so a consumer that saw it also sees the freed slot
        with self._lock:
            tracked.done = True
            if tracked.running:
                self._scheduler.release(tracked.footprint)
            if self._by_id.get(tracked.request.request_id) is tracked:
                del self._by_id[tracked.request.request_id]
            self._cancelled.discard(tracked)
            self._total_finished += 1
        if tracked.running:
            self._running.remove(tracked)
            tracked.running = False
            with self._lock:
                self._cache_bytes = sum(t.seq.cache_bytes() for t in self._running)
        self._emit(
            tracked,
            GenerationOutput(
                request_id=tracked.request.request_id,
                text_delta=text,
                token_ids_delta=list(ids or []),
                finished=True,
                finish_reason=reason,
                prompt_tokens=len(tracked.prompt),
                completion_tokens=len(tracked.detok.token_ids),
                nfe=nfe,
                error=error if reason in ("error", "abort") else None,
            ),
        )
        self._observe(
            "on_request_finished",
            RequestStats(
                request_id=tracked.request.request_id,
                prompt_tokens=len(tracked.prompt),
                completion_tokens=len(tracked.detok.token_ids),
                nfe=nfe,
                steps=tracked.steps,
                finish_reason=reason,
                queue_time_s=(tracked.first_step or now) - tracked.arrival,
                ttft_s=None if tracked.first_token is None else tracked.first_token - tracked.arrival,
                e2e_s=now - tracked.arrival,
            ),
        )

    def _abort_all(self, reason: FinishReason, message: str) -> None:
        with self._lock:
            waiting = self._scheduler.remove_waiting(lambda t: True)
        for tracked in [*self._running, *waiting]:
            self._finish(tracked, reason, message)
        with self._lock:
            self._cache_bytes = 0

    def _emit(self, tracked: _Tracked, out: GenerationOutput) -> None:
        if out.token_ids_delta and tracked.first_token is None:
            tracked.first_token = time.monotonic()
        if not tracked.request.stream:  # one output at the end: all the detokenizer has emitted
            if not out.finished:
                return
            out = replace(out, text_delta=tracked.detok.text, token_ids_delta=list(tracked.detok.token_ids))
        if self._outbox is not None:  # inside a step: one loop wake-up per step, not per request
            self._outbox.setdefault(tracked.sink, []).append((tracked, out))
            return
        self._send(tracked.sink, [(tracked, out)])

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox or {}, None
        for sink, items in outbox.items():
            self._send(sink, items)

    def _send(self, sink: OutputSink, items: list[tuple[_Tracked, GenerationOutput]]) -> None:
        try:
            sink.send([(t.queue, out) for t, out in items])
        except RuntimeError:  # e.g. the consumers' loop is closed: nobody is listening any more
            for tracked, out in items:
                if not out.finished:
                    self._cancel(tracked)

    def _observe(self, method: str, stats: StepStats | RequestStats) -> None:
        notify(self.observer, method, stats)


def _deliver(items: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    """Runs on the consumers' event loop: hand each output to its request's queue."""
    for queue, out in items:
        queue.put_nowait(out)


def _param_of(exc: ValueError) -> str | None:
    """`DecodingParams.validate` messages start with the field name: `"steps: must be ..."`."""
    head = str(exc).split(":", 1)[0].strip()
    return head if head.isidentifier() else None
