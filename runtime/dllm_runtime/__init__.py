"""dllm-serve runtime: native diffusion LLMs, exact decoders, a batching engine, a KServe OpenAI server."""

__version__ = "0.1.0"
