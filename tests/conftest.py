"""Session-wide fixtures shared by all test tiers (append new fixtures below)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny LLaDA folder (real config format, LLaDA special ids and chat template)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llada"), arch="llada")


@pytest.fixture(scope="session")
def tiny_dream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Dream folder (Qwen2 layout, GQA, Dream special ids and ChatML template)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-dream"), arch="dream")
