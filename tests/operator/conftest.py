"""Shared spec factories for the operator unit tests."""

from __future__ import annotations

import copy
from typing import Any

import pytest


def dlm_body(name: str = "llada", namespace: str = "models", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "serving.dllm.io/v1alpha1",
        "kind": "DiffusionLM",
        "metadata": {"name": name, "namespace": namespace, "uid": "0b7c1c52-4b8e-4d0c-9a57-1d2a3b4c5d6e",
                     "generation": 3},
        "spec": {"model": {"uri": "hf://GSAI-ML/LLaDA-8B-Instruct"}},
    }
    body["spec"].update(copy.deepcopy(spec))
    return body


@pytest.fixture
def body() -> dict[str, Any]:
    return dlm_body()
