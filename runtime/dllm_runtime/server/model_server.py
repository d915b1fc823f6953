"""`kserve.ModelServer` with one REST worker, optional gRPC, `--host`, and a draining SIGTERM.

kserve's `start()` binds 0.0.0.0 and lets uvicorn react to SIGTERM by closing the listener at once,
so requests arriving during a rollout would see connection errors. Here SIGTERM first *drains*:
the listener stays open, readiness and new requests answer 503 (so the endpoint is removed and
clients retry elsewhere), in-flight requests get `--grace-period` seconds to finish, and only then
uvicorn's own shutdown runs. A second SIGTERM/SIGINT exits at once.

It relies on two kserve 0.21 details, both pinned (pyproject `kserve>=0.21`, hack/constraints.txt):
`RESTServer`'s constructor and its uvicorn server at `RESTServer._server` (for `started`/`should_exit`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.rest.server import RESTServer

from dllm_runtime.server.model import DiffusionLMModel

logger = logging.getLogger("dllm_runtime.server")


class DllmModelServer(ModelServer):
    """kserve's server for exactly one `DiffusionLMModel`."""

    def __init__(self, *, host: str, port: int, grace_period: float, enable_grpc: bool, grpc_port: int) -> None:
        super().__init__(
            http_port=port,
            grpc_port=grpc_port,
            workers=1,  # one engine owns the device: never fork more HTTP workers
            enable_grpc=enable_grpc,
            enable_docs_url=False,
            enable_latency_logging=False,  # kserve's predict timings do not apply to our routes
            grace_period=max(1, int(grace_period) + 1),
        )
        # kserve's TimingMiddleware logs two trace lines per request; uvicorn's access log is enough
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
        self.host = host
        self.drain_grace_period = grace_period
        self.exit_code = 0
        self._model: DiffusionLMModel | None = None
        self._draining = False

    def fail(self, reason: str) -> None:
        """Stop the server with exit code 1 (the model could not be loaded)."""
        self.exit_code = 1
        if self._rest_server is not None:
            self._rest_server._server.should_exit = True

    def start(self, models: list[Any]) -> None:  # type: ignore[override]
        if len(models) != 1 or not isinstance(models[0], DiffusionLMModel):
            raise ValueError("DllmModelServer serves exactly one DiffusionLMModel")
        model = self._model = models[0]
        self.register_model(model)
        model.start()
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        self._rest_server.config.host = self.host
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            from kserve.model_server import args as kserve_args
            from kserve.protocol.grpc.server import GRPCServer

            self._grpc_server = GRPCServer(
                self.grpc_port, self.dataplane, self.model_repository_extension,
                kwargs=vars(kserve_args), grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.servers.append(model.start_engine())
        self.servers.append(self._install_drain_on_sigterm())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    async def _install_drain_on_sigterm(self) -> None:
        """Once uvicorn has installed its handlers, put the draining SIGTERM handler in front."""
        server = self._rest_server._server
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        uvicorn_handler = signal.getsignal(signal.SIGTERM)
        loop = asyncio.get_running_loop()

        def on_sigterm(sig: int, frame: Any) -> None:
            if self._draining:  # second signal: skip the rest of the grace period
                uvicorn_handler(sig, frame)
                return
            self._draining = True
            logger.info("SIGTERM: draining for up to %.1fs", self.drain_grace_period)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(uvicorn_handler, sig)))

        signal.signal(signal.SIGTERM, on_sigterm)

    async def _drain_then_exit(self, uvicorn_handler: Any, sig: int) -> None:
        try:
            if self._model is not None:
                await self._model.drain(self.drain_grace_period)
        except Exception:
            logger.exception("drain failed; shutting down anyway")
        finally:
            uvicorn_handler(sig, None)
