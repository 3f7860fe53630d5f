"""PAGEDSERVE_DECODE_SPLITS pins the decode kernel's split count (A/B runs); 0 or unset leaves it per call."""

from __future__ import annotations

import pytest

from pagedserve.executor.attention.triton_backend import TritonAttentionBackend


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", None), ("1", 1), ("8", 8), ("64", 64)])
def test_env_pins_splits(monkeypatch, value, expected) -> None:
    if value is None:
        monkeypatch.delenv("PAGEDSERVE_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("PAGEDSERVE_DECODE_SPLITS", value)
    assert TritonAttentionBackend().decode_num_splits == expected
    assert TritonAttentionBackend(decode_num_splits=2).decode_num_splits == 2  # an explicit value wins


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_env_rejects_bad_values(monkeypatch, value) -> None:
    monkeypatch.setenv("PAGEDSERVE_DECODE_SPLITS", value)
    with pytest.raises(ValueError, match="PAGEDSERVE_DECODE_SPLITS"):
        TritonAttentionBackend()
