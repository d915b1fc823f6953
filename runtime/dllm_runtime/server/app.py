"""HTTP routes, registered on kserve's FastAPI app *before* kserve adds its own.

Starlette matches routes in order, so our `GET /v1/models` (OpenAI list) and `/v1/models/{name}`
(OpenAI model object that doubles as KServe's v1 readiness: 200 only when ready) win over kserve's
V1 handlers, while kserve keeps serving `/` (liveness), the rest of `/v2/...` and
`/metrics` (the default Prometheus registry, where our metrics live). `/v2/models/{name}/ready` is
ours too, only to keep kserve from logging a traceback per probe while the model loads. The OpenAI API is mounted at
`/v1` (vLLM's paths) and `/openai/v1` (KServe's OpenAI prefix).
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dllm_runtime.server import protocol
from dllm_runtime.server.errors import (
    APIError,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Unauthorized,
    Unavailable,
    api_error_handler,
)
from dllm_runtime.server.model import DiffusionLMModel
from dllm_runtime.server.serving import OpenAIServing

API_PREFIXES = ("/v1", "/openai/v1")


class Routes:
    """Route handlers bound to one served model."""

    def __init__(self, model: DiffusionLMModel, serving: OpenAIServing) -> None:
        self.model = model
        self.serving = serving
        self.settings = model.settings

    # ---------------------------------------------------------------- guards
    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized("Invalid or missing API key (send `Authorization: Bearer <key>`)",
                               code="invalid_api_key")

    def _require_ready(self) -> None:
        if self.model.draining:
            raise Unavailable("the server is shutting down", code="shutting_down",
                              headers={"Retry-After": str(self.settings.retry_after)})
        if not self.model.ready:
            raise Unavailable("the model is loading", code="model_not_ready",
                              headers={"Retry-After": str(self.settings.retry_after)})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = PayloadTooLarge(f"request body exceeds the {limit}-byte limit", code="body_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    # ---------------------------------------------------------------- OpenAI
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, self.serving.completions)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, self.serving.chat)

    async def _generate(self, request: Request, handler) -> Response:
        """Guards, then the handler; client errors are counted in `dllm:request_errors_total`."""
        self._authorize(request)
        self._require_ready()
        try:
            return await handler(request, await self._read_body(request))
        except (BadRequest, NotFound, PayloadTooLarge):
            self.model.metrics.count_error("validation")
            raise
        except QueueFull:
            self.model.metrics.count_error("queue_full")
            raise

    def _card(self) -> dict:
        loaded = self.model.loaded
        max_len = loaded.max_model_len if loaded else None  # not known until the weights are in
        return protocol.model_card(self.model.name, self.model.created, max_len, str(self.model.model_path))

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_status(self, request: Request, model_name: str) -> Response:
        """OpenAI `models.retrieve` and KServe v1 readiness in one: 200 + `ready: true` only when ready."""
        if model_name != self.model.name:
            raise NotFound(f"The model `{model_name}` does not exist.", param="model", code="model_not_found")
        ready = await self.model.healthy()
        body = {**self._card(), "name": self.model.name, "ready": ready}
        if not ready:
            reason = ("shutting down" if self.model.draining
                      else "engine not running" if self._engine_dead() else "loading")
            body["error"] = Unavailable(f"model is not ready ({reason})", code="model_not_ready").body()["error"]
        return JSONResponse(body, status_code=200 if ready else 503)

    async def v2_model_ready(self, model_name: str) -> Response:
        """KServe v2 model readiness, answered here so a loading model is a quiet 503 (kserve's own
        handler logs a traceback on every probe until the weights are in)."""
        if model_name != self.model.name:
            raise NotFound(f"The model `{model_name}` does not exist.", param="model", code="model_not_found")
        ready = await self.model.healthy()
        return JSONResponse({"name": model_name, "ready": ready}, status_code=200 if ready else 503)

    # ---------------------------------------------------------------- health
    async def health(self) -> Response:
        """Liveness: 200 while the process makes progress (loading, serving, draining), 503 once the
        engine has died or the load failed, so a livenessProbe here restarts a wedged pod without
        killing one that is still loading large weights (readiness is separate)."""
        if self.model.load_error is not None or self._engine_dead():
            return JSONResponse(Unavailable("engine not running", code="engine_not_running").body(), status_code=503)
        return Response(status_code=200)

    def _engine_dead(self) -> bool:
        """The engine ran and stopped without a shutdown (its thread or process is gone)."""
        loaded = self.model.loaded
        return loaded is not None and self.model.ready and not loaded.engine.is_running


def register_routes(app: FastAPI, model: DiffusionLMModel, serving: OpenAIServing) -> Routes:
    """Add our routes to `app` (call before kserve's RESTServer registers its own)."""
    routes = Routes(model, serving)
    app.add_exception_handler(APIError, api_error_handler)
    for prefix in API_PREFIXES:
        app.add_api_route(f"{prefix}/completions", routes.completions, methods=["POST"], include_in_schema=True)
        app.add_api_route(f"{prefix}/chat/completions", routes.chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/models", routes.list_models, methods=["GET"])
        app.add_api_route(f"{prefix}/models/{{model_name}}", routes.model_status, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/ready", routes.v2_model_ready, methods=["GET"])
    app.add_api_route("/health", routes.health, methods=["GET"])
    return routes
