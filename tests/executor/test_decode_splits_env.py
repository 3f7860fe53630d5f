"""PAGEDSERVE_DECODE_SPLITS pins the decode kernel's split count (A/B runs); 0 or unset leaves it per call."""

from __future__ import annotations

import pytest

# Imported inside the tests: importing Triton kernels at collection, before tests/kernels/conftest.py sets
# TRITON_INTERPRET, would decorate Triton's own library functions for the compiler and break the interpreter.


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", None), ("1", 1), ("8", 8), ("64", 64)])
def test_env_pins_splits(monkeypatch, value, expected) -> None:
    if value is None:
        monkeypatch.delenv("PAGEDSERVE_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("PAGEDSERVE_DECODE_SPLITS", value)
    from pagedserve.executor.attention.triton_backend import TritonAttentionBackend

    assert TritonAttentionBackend().decode_num_splits == expected
    assert TritonAttentionBackend(decode_num_splits=2).decode_num_splits == 2  # an explicit value wins


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_env_rejects_bad_values(monkeypatch, value) -> None:
    monkeypatch.setenv("PAGEDSERVE_DECODE_SPLITS", value)
    from pagedserve.executor.attention.triton_backend import TritonAttentionBackend

    with pytest.raises(ValueError, match="PAGEDSERVE_DECODE_SPLITS"):
        TritonAttentionBackend()
