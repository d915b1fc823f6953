"""Continuous-batching diffusion engine: one step loop batching every running sequence."""
