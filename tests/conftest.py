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
