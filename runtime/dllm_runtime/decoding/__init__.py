"""Decoding policies reproducing LLaDA, Fast-dLLM, Dream and d3LLM token for token."""
