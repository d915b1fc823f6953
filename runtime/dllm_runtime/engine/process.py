"""`EngineProcess`: the engine in a child process, behind `AsyncEngine`'s interface.

Why: in one process the server's event loop (HTTP parsing, tokenization, JSON, one SSE event per
delta) and the engine's step loop share one interpreter lock, so every delta the server streams is
time the step loop waits for. vLLM runs its engine core in its own process for this reason;
`dllm-serve serve --engine-process` does the same (off by default: see docs/engine.md). The child
owns the device and the model and runs an ordinary `AsyncEngine`; the parent keeps the tokenizer
(chat templates, prompt encoding) and everything HTTP.

Wire: one duplex `multiprocessing` pipe of pickled tuples (requests, outputs and statistics are small
dataclasses).

    parent -> child   ("submit", GenerationRequest)   ("cancel", request_id)   ("stop", timeout_s)
    child -> parent   ("ready", ModelInfo) | ("failed", message)                  once, after loading
                      ("accepted", request_id) | ("rejected", request_id, kind, message, param)
                      ("outputs", [GenerationOutput, ...])                        one per step
                      ("step", StepStats, EngineStats)   ("finished", RequestStats, EngineStats)
                      ("stats", EngineStats)   ("stopped",)

The child's worker thread writes each step's outputs itself (`_PipeSink`); its main thread reads the
pipe. The child stops after "stop" or when the pipe closes (the parent died). The parent reads the pipe
on a thread of its own and hands outputs to the requests' event loops, one wake-up per loop per step,
as `AsyncEngine` does in one process. A pipe that closes without "stopped" is an engine crash: every
open request ends with `finish_reason="error"` and `is_running` turns False, so liveness fails and
Kubernetes restarts the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dllm_runtime.engine.config import EngineConfig
from dllm_runtime.engine.request import (
    EngineShutdownError,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RequestValidationError,
)
from dllm_runtime.engine.stats import EngineObserver, EngineStats, RequestStats, StepStats, notify

logger = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The child could not load the model; the message is the child's error."""


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build its engine (picklable)."""

    model_path: str
    dtype: str | None  # None: the checkpoint's
    device: str  # `auto`, `cpu`, `cuda`, `cuda:N`
    config: EngineConfig


@dataclass(frozen=True)
class ModelInfo:
    """What the parent learns about the loaded model."""

    model_type: str
    vocab_size: int
    device: str


# ---------------------------------------------------------------------------------------- child
class _Writer:
    """The child's end of the pipe, shared by its main thread (replies) and worker thread (outputs)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def __call__(self, *message: Any) -> None:
        try:
            with self.lock:
                self.conn.send(message)
        except (OSError, ValueError) as exc:  # the parent is gone: nobody listens any more
            raise RuntimeError(f"engine pipe closed: {exc}") from exc


@dataclass(frozen=True, eq=False)
class _PipeSink:
    """Every request the child runs uses this one sink: a step's outputs are one message."""

    write: _Writer

    def send(self, outputs: list[tuple[asyncio.Queue | None, GenerationOutput]]) -> None:
        self.write("outputs", [out for _, out in outputs])


class _PipeObserver:
    """Forwards the engine's statistics, each with a fresh snapshot for the parent's `stats()`."""

    def __init__(self, write: _Writer) -> None:
        self.write = write
        self.engine: Any = None

    def on_step(self, stats: StepStats) -> None:
        self.write("step", stats, self.engine.stats())

    def on_request_finished(self, stats: RequestStats) -> None:
        self.write("finished", stats, self.engine.stats())


def _child_main(conn: Connection, spec: EngineSpec) -> None:
    """The engine process: load, then serve the pipe until "stop" or until the parent is gone."""
    # the parent decides when the engine stops (a SIGTERM to the pod drains through the parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    write = _Writer(conn)
    try:
        observer = _PipeObserver(write)
        engine, info = build_engine(spec, observer)
        observer.engine = engine
    except BaseException as exc:  # report every load failure, then exit
        with contextlib.suppress(RuntimeError):
            write("failed", f"{type(exc).__name__}: {exc}")
        return
    engine.start()
    sink = _PipeSink(write)
    try:
        write("ready", info)
        while _handle(conn.recv(), engine, sink, write):
            pass
    except (EOFError, OSError, RuntimeError):  # the parent is gone
        engine.stop(0.0)
        return
    with contextlib.suppress(RuntimeError):
        write("stopped")


def build_engine(spec: EngineSpec, observer: EngineObserver | None) -> tuple[Any, ModelInfo]:
    """Load the model and tokenizer `spec` names onto its device and wrap them in an `AsyncEngine`
    (not started). The server calls this for an in-process engine; the engine process, for its own."""
    import torch

    from dllm_runtime.engine.engine import AsyncEngine
    from dllm_runtime.models import load_model
    from dllm_runtime.tokenizer import load_tokenizer

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(spec.model_path, dtype=spec.dtype, device=device)
    engine = AsyncEngine(model, load_tokenizer(spec.model_path), spec.config, observer=observer)
    return engine, ModelInfo(str(model.model_type), int(model.vocab_size), device)


def _handle(message: tuple, engine: Any, sink: _PipeSink, write: _Writer) -> bool:
    """One message from the parent; False after "stop"."""
    kind = message[0]
    if kind == "submit":
        request: GenerationRequest = message[1]
        try:
            engine.submit(request, sink)
        except (RequestValidationError, QueueFullError) as exc:
            write("rejected", request.request_id, _error_kind(exc), str(exc), getattr(exc, "param", None))
        else:
            write("accepted", request.request_id)
    elif kind == "cancel":
        engine.cancel(message[1])
    elif kind == "stop":
        engine.stop(float(message[1]))
        return False
    else:
        logger.error("engine process: unknown message %r (ignored)", kind)
    write("stats", engine.stats())
    return True


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, EngineShutdownError):
        return "shutdown"
    if isinstance(exc, QueueFullError):
        return "queue_full"
    return "validation"


def _rebuild_error(kind: str, message: str, param: str | None) -> Exception:
    if kind == "shutdown":
        return EngineShutdownError(message)
    if kind == "queue_full":
        return QueueFullError(message)
    return RequestValidationError(message, param)


# --------------------------------------------------------------------------------------- parent
@dataclass
class _Open:
    """A request the parent has sent and not yet seen finish."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future


def _put(items: list[tuple[_Open, GenerationOutput]]) -> None:
    """On the requests' loop: queue each output. An output also proves its request was accepted: the
    worker may write a short request's outputs before the main thread writes "accepted"."""
    for entry, out in items:
        if not entry.accepted.done():
            entry.accepted.set_result(None)
        entry.queue.put_nowait(out)


class EngineProcess:
    """`AsyncEngine`'s interface (`generate`, `cancel`, `stats`, `shutdown`, `is_running`) for an engine
    that runs in a child process. `load()` starts the child and blocks until its model is loaded."""

    def __init__(self, spec: EngineSpec, observer: EngineObserver | None = None) -> None:
        self.spec = spec
        self.observer = observer
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._running = False
        self._stopped_cleanly = False
        config = spec.config
        self._stats = EngineStats(
            num_running=0, num_waiting=0, max_num_seqs=config.max_num_seqs, batch_occupancy=0.0, total_steps=0,
            total_forwards=0, total_tokens_committed=0, total_requests_finished=0, cache_bytes=0,
            reserved_cache_bytes=0, max_cache_bytes=config.max_cache_bytes, last_step_latency_s=0.0,
        )

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> ModelInfo:
        """Start the child and wait for its model (blocking: call it off the event loop)."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_child_main, args=(child_end, self.spec), name="dllm-engine", daemon=True
        )
        self._process.start()
        child_end.close()  # the parent keeps one end: EOF on it means the child is gone
        try:
            reply = self._conn.recv()
        except EOFError:
            self._process.join()
            raise EngineLoadError(f"the engine process exited while loading (exit code {self._process.exitcode})") from None
        if reply[0] != "ready":
            self._process.join()
            raise EngineLoadError(reply[1])
        self._running = True
        self._reader = threading.Thread(target=self._read, name="dllm-engine-pipe", daemon=True)
        self._reader.start()
        return reply[1]

    def start(self) -> None:
        """The child's engine runs from the end of `load` (kept for `AsyncEngine`'s interface)."""

    @property
    def is_running(self) -> bool:
        return self._running and self._process is not None and self._process.is_alive()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish within `timeout` s (the child aborts the rest), then end the child."""
        if self._process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop", timeout))
        await asyncio.to_thread(self._process.join, timeout + 30.0)
        if self._process.is_alive():  # a forward that never returns: do not hang the pod's shutdown
            logger.error("engine process did not stop within %.0fs: killing it", timeout + 30.0)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join)

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """As `AsyncEngine.generate`: the child's rejection is raised before the first output."""
        loop = asyncio.get_running_loop()
        entry = _Open(loop, asyncio.Queue(), loop.create_future())
        with self._lock:
            if not self._running:
                raise EngineShutdownError("the engine is not running")
            if request.request_id in self._open:
                raise RequestValidationError(f"request_id: {request.request_id!r} is already in flight", "request_id")
            self._open[request.request_id] = entry
        finished = False
        try:
            try:
                self._send(("submit", request))
            except (OSError, ValueError):
                raise EngineShutdownError("the engine process is gone") from None
            await entry.accepted
            while True:
                out = await entry.queue.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                if self._open.get(request.request_id) is entry:
                    del self._open[request.request_id]
            accepted = entry.accepted
            rejected = accepted.done() and not accepted.cancelled() and accepted.exception() is not None
            if not finished and not rejected:  # the consumer left: stop decoding for nobody
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        """Abort a request (thread-safe; unknown or finished ids are ignored by the child)."""
        with contextlib.suppress(OSError, ValueError):
            self._send(("cancel", request_id))

    def stats(self) -> EngineStats:
        """The child's latest snapshot (sent with every step, finished request and handled message)."""
        return self._stats

    def _send(self, message: tuple) -> None:
        if self._conn is None:
            raise EngineShutdownError("the engine process is not started")
        with self._send_lock:
            self._conn.send(message)

    # ------------------------------------------------------------------ the pipe reader (a thread)
    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                if not self._dispatch(message):
                    self._stopped_cleanly = True
                    break
            except Exception:  # a bug here must not silence every later output
                logger.exception("engine pipe: cannot handle %r", message[0])
        self._closed()

    def _dispatch(self, message: tuple) -> bool:
        kind = message[0]
        if kind == "outputs":
            self._deliver(message[1])
        elif kind == "accepted":
            self._resolve(message[1], None)
        elif kind == "rejected":
            self._resolve(message[1], _rebuild_error(*message[2:]))
        elif kind == "step":
            self._stats = message[2]
            self._observe("on_step", message[1])
        elif kind == "finished":
            self._stats = message[2]
            self._observe("on_request_finished", message[1])
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "stopped":
            return False
        return True

    def _deliver(self, outputs: list[GenerationOutput]) -> None:
        """Hand a step's outputs to their requests' loops: one wake-up per loop, as in one process."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Open, GenerationOutput]]] = {}
        with self._lock:
            for out in outputs:
                entry = self._open.get(out.request_id)
                if entry is None:  # its consumer left; the child has been told to cancel it
                    continue
                if out.finished:
                    del self._open[out.request_id]
                by_loop.setdefault(entry.loop, []).append((entry, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody reads these
                loop.call_soon_threadsafe(_put, items)

    def _resolve(self, request_id: str, error: Exception | None) -> None:
        with self._lock:
            entry = self._open.get(request_id)
        if entry is None:
            return

        def settle() -> None:
            if entry.accepted.done():
                return
            if error is None:
                entry.accepted.set_result(None)
            else:
                entry.accepted.set_exception(error)

        with contextlib.suppress(RuntimeError):
            entry.loop.call_soon_threadsafe(settle)

    def _observe(self, method: str, stats: StepStats | RequestStats) -> None:
        notify(self.observer, method, stats)

    def _closed(self) -> None:
        """The pipe is done: after "stopped" nothing is open; otherwise the child died under us."""
        self._running = False
        with self._lock:
            left, self._open = self._open, {}
        if not self._stopped_cleanly:
            code = None if self._process is None else self._process.exitcode
            logger.error("the engine process exited unexpectedly (exit code %s); %d request(s) failed", code, len(left))
        message = "the engine process exited" + ("" if self._stopped_cleanly else " unexpectedly")
        for request_id, entry in left.items():
            final = GenerationOutput(request_id, finished=True, finish_reason="error", error=message)

            def fail(entry: _Open = entry, final: GenerationOutput = final) -> None:
                if not entry.accepted.done():
                    entry.accepted.set_exception(EngineShutdownError(message))
                else:
                    entry.queue.put_nowait(final)

            with contextlib.suppress(RuntimeError):
                entry.loop.call_soon_threadsafe(fail)
