"""The OpenAI-compatible KServe model server (`dllm-serve serve`)."""
