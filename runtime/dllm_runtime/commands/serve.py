"""`dllm-serve serve` (= `python -m dllm_runtime`): the OpenAI-compatible KServe model server."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from dllm_runtime.server import args as server_args

logger = logging.getLogger("dllm_runtime.server")

DEMO_MODEL_NAME = "dllm-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server_args.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = server_args.resolve(args)
    except server_args.SettingsError as exc:
        print(f"dllm-serve serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        model_path, default_name = _model_path(settings.model, settings.model_wait_timeout)
        base_params = _base_params(settings.decoding)
    except ValueError as exc:
        print(f"dllm-serve serve: error: {exc}", file=sys.stderr)
        return 2
    if settings.served_model_name is None:
        settings.served_model_name = default_name
    if settings.trust_remote_code:
        logger.info("--trust-remote-code is accepted for vLLM compatibility and ignored: no remote code is run")

    # kserve parses sys.argv when imported; hide our flags from it (`--model` would match its
    # `--model_name` by prefix) so kserve sees only defaults and everything comes from `settings`.
    sys.argv = sys.argv[:1]
    # kserve 0.21 builds its app with FastAPI's deprecated ORJSONResponse; say it once, not per request
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    from kserve.model_server import app

    from dllm_runtime.server.app import register_routes
    from dllm_runtime.server.metrics import ServerMetrics
    from dllm_runtime.server.model import DiffusionLMModel
    from dllm_runtime.server.model_server import DllmModelServer
    from dllm_runtime.server.serving import OpenAIServing

    server = DllmModelServer(host=settings.host, port=settings.port, grace_period=settings.grace_period,
                             enable_grpc=settings.enable_grpc, grpc_port=settings.grpc_port)
    metrics = ServerMetrics(settings.served_model_name)
    model = DiffusionLMModel(settings, model_path, metrics, on_fatal=server.fail, model_wait_timeout=settings.model_wait_timeout)
    register_routes(app, model, OpenAIServing(model, base_params, algorithm_set="algorithm" in settings.decoding))
    logger.info("serving %s as %r on http://%s:%d (OpenAI API at /v1 and /openai/v1)",
                model_path, model.name, settings.host, settings.port)
    server.start([model])
    return server.exit_code


def _model_path(model: str | None, wait: float | None) -> tuple[Path, str]:
    """The folder to serve and its default served name; a clear error instead of a late failure."""
    if model is None:
        from dllm_runtime.demo import DemoModelMissingError, demo_model_path

        try:
            return demo_model_path(), DEMO_MODEL_NAME
        except DemoModelMissingError as exc:
            raise ValueError(f"no --model given and {exc}") from None
    path = Path(model).expanduser()
    if not wait:
        if not path.is_dir():
            raise ValueError(f"--model {model}: not a folder (expected config.json + *.safetensors + tokenizer)")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: no config.json in the folder")
    return path.resolve(), path.resolve().name or "model"


def _base_params(decoding: dict):
    """Server-default DecodingParams from the diffusion flags, validated at startup."""
    from dllm_runtime.decoding.params import DecodingParams

    try:
        return DecodingParams.from_dict(decoding).validate()
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        raise ValueError(f"--{field.replace('_', '-')}: {exc}") from None
