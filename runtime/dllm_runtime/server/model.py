"""The `kserve.Model` that owns the diffusion engine (KServe's `engine=True` pattern).

HTTP comes up at once; `start_engine` loads weights and tokenizer in a worker thread (never on the
event loop) and only then marks the model ready, so `/v1/models/{name}` and `/v2/models/{name}/ready`
answer 503 while loading and 200 after. On SIGTERM the server calls `drain`: readiness drops to 503,
new requests get 503, in-flight requests may finish within the grace period, then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kserve

from dllm_runtime.server.args import ServeSettings
from dllm_runtime.server.metrics import ServerMetrics

logger = logging.getLogger("dllm_runtime.server")

#: default max_model_len when neither the flag nor the config bounds it lower: a diffusion canvas
#: is attended in full at every step, so the positional limit of long-context checkpoints
#: (Dream: 131072) is far beyond what a request should be allowed to ask for by default.
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class Loaded:
    """What `start_engine` produced."""

    engine: Any  # dllm_runtime.engine: AsyncEngine, or EngineProcess with --engine-process
    tokenizer: Any
    model_type: str
    max_model_len: int
    vocab_size: int


class DiffusionLMModel(kserve.Model):
    """One served diffusion LM: lifecycle, readiness, drain and in-flight accounting."""

    def __init__(
        self,
        settings: ServeSettings,
        model_path: Path,
        metrics: ServerMetrics,
        on_fatal: Callable[[str], None] | None = None,
        model_wait_timeout: float = 0.0,
    ) -> None:
        super().__init__(settings.served_model_name or model_path.name)
        self.engine = True  # kserve: start_engine() runs inside the server's event loop
        self.ready = False
        self.settings = settings
        self.model_path = model_path
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.model_wait_timeout = model_wait_timeout
        self.created = int(time.time())
        self.loaded: Loaded | None = None
        self.load_error: str | None = None
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()  # set by drain/unload: a load still running is abandoned

    # ------------------------------------------------------------------ kserve lifecycle
    def start(self) -> None:
        """kserve calls this at registration; readiness waits for `start_engine` instead."""

    async def start_engine(self) -> None:
        """Load weights off the event loop, then start the engine and become ready.

        The load runs in a daemon thread rather than the loop's executor: a SIGTERM during a long
        load must let the process exit now, and `asyncio.run` joins executor threads on the way out.
        """
        loop = asyncio.get_running_loop()
        loading: asyncio.Future[Loaded] = loop.create_future()

        def target() -> None:
            try:
                result, error = self._load_blocking(), None
            except Exception as exc:  # reported on the loop below
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                loop.call_soon_threadsafe(_resolve, loading, result, error)

        threading.Thread(target=target, name="dllm-load", daemon=True).start()
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            logger.info("shutdown requested while loading %s: not starting the engine", self.model_path)
            return
        if loading.exception() is not None:  # any load failure is fatal for this process: say why, exit 1
            exc = loading.exception()
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("failed to load model from %s: %s", self.model_path, self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        self.loaded = loading.result()
        self.metrics.bind_engine(self.loaded.engine.stats)
        if self._stopping.is_set():
            return
        self.loaded.engine.start()
        self.ready = True
        logger.info("model %r ready (%s, max_model_len=%d)", self.name, self.loaded.model_type,
                    self.loaded.max_model_len)

    def stop_engine(self) -> None:
        """kserve calls this on unload (after the HTTP server stopped); the drain, if any, already ran."""
        self.ready = False
        self._stopping.set()

    async def healthy(self) -> bool:
        return self.ready and self.loaded is not None and not self.draining and self.loaded.engine.is_running

    # ------------------------------------------------------------------ loading (worker thread)
    def _load_blocking(self) -> Loaded:
        self._wait_for_model_folder()
        # heavy imports (torch, the models) happen here and in `build_engine`, after HTTP is already up
        from dllm_runtime.engine.config import EngineConfig
        from dllm_runtime.engine.process import EngineProcess, EngineSpec, build_engine
        from dllm_runtime.tokenizer import load_tokenizer

        s = self.settings
        started = time.monotonic()
        max_model_len = s.max_model_len or min(_config_max_len(self.model_path) or DEFAULT_MAX_MODEL_LEN,
                                               DEFAULT_MAX_MODEL_LEN)
        defaults = EngineConfig()
        config = EngineConfig(
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens or max(defaults.max_num_batched_tokens, max_model_len),
            max_model_len=max_model_len,
            max_waiting=s.max_waiting,
            max_cache_bytes=s.max_cache_bytes or defaults.max_cache_bytes,
        )
        config.validate()  # a bad flag fails here, before a process starts
        spec = EngineSpec(str(self.model_path), None if s.dtype == "auto" else s.dtype, s.device, config)
        if s.engine_process:  # the child loads the weights and owns the device; the server keeps a tokenizer
            engine: Any = EngineProcess(spec, observer=self.metrics)
            info = engine.load()
            tokenizer = load_tokenizer(self.model_path)  # chat templates, prompt encoding
        else:
            engine, info = build_engine(spec, observer=self.metrics)
            tokenizer = engine.tokenizer
        logger.info("loaded %s on %s in %.1fs%s", self.model_path, info.device, time.monotonic() - started,
                    " (engine process)" if s.engine_process else "")
        return Loaded(engine, tokenizer, info.model_type, max_model_len, info.vocab_size)

    def _wait_for_model_folder(self) -> None:
        """Wait for `config.json` (a modelcar sidecar or a copy may still be filling the folder)."""
        config = self.model_path / "config.json"
        deadline = time.monotonic() + self.model_wait_timeout
        while not config.is_file():
            if time.monotonic() >= deadline:
                raise FileNotFoundError(f"{config} not found (waited {self.model_wait_timeout:g}s)")
            time.sleep(0.2)

    # ------------------------------------------------------------------ in-flight accounting
    def admit(self) -> Ticket:
        """Count one HTTP generation as in flight until `Ticket.release()` (its response is sent)."""
        self.inflight += 1
        self._idle.clear()
        return Ticket(self)

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, grace_period: float) -> None:
        """Stop admitting, wait up to `grace_period` s for in-flight requests, then stop the engine."""
        self.draining = True
        self.ready = False
        self._stopping.set()
        logger.info("draining: %d request(s) in flight, grace period %.1fs", self.inflight, grace_period)
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_period)
        remaining = max(0.0, grace_period - (time.monotonic() - started))
        if self.loaded is not None:
            # aborts whatever is still running when the grace period is over
            await self.loaded.engine.shutdown(timeout=remaining if self.inflight else 0.0)
        # let aborted responses flush their final bytes before uvicorn closes connections
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=1.0)
        logger.info("drained in %.1fs (%d request(s) cut short)", time.monotonic() - started, self.inflight)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Ticket:
    """One in-flight generation; `release` is idempotent because a stream has two exits (its body's
    `finally` and the response's background task, which also runs when the body never started)."""

    def __init__(self, model: DiffusionLMModel) -> None:
        self._model: DiffusionLMModel | None = model

    def release(self) -> None:
        if self._model is not None:
            self._model._release()
            self._model = None


def _config_max_len(model_path: Path) -> int | None:
    """`max_sequence_length` (LLaDA) or `max_position_embeddings` (Dream) from config.json."""
    try:
        cfg = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_sequence_length", "max_position_embeddings"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
