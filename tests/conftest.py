"""Shared fixtures. The real model is the embedded default (Qwen2.5-Coder-0.5B-Instruct), fetched and
converted once; PAGEDSERVE_TEST_MODEL_DIR points at an already converted folder to skip that."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    path = os.environ.get("PAGEDSERVE_TEST_MODEL_DIR")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path
    from pagedserve.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def qwen_gguf_path() -> str:
    """The embedded default model's GGUF (sha256-verified), fetched once into the cache."""
    path = os.environ.get("PAGEDSERVE_TEST_GGUF")
    if path and os.path.isfile(path):
        return path
    from pagedserve.default_model import ensure_gguf

    return ensure_gguf()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct (llama architecture, Q4_1), sha256-verified, fetched once into the cache."""
    from pagedserve.default_model import SMOLLM2, ensure_gguf

    return ensure_gguf(SMOLLM2)
