"""The Gluon decode GEMM's host-side choices (no GPU needed): the env range and the token tiles."""

from __future__ import annotations

import pytest

from pagedserve.executor.layers import _ws_gemm_range


def test_ws_gemm_range_parses_off_default_and_bounds():
    assert _ws_gemm_range("0") == (1, 0) and _ws_gemm_range("") == (1, 0)  # off: no m fits
    assert _ws_gemm_range("1") == (65, 256)
    assert _ws_gemm_range("33-144") == (33, 144)
    for bad in ("yes", "0-300", "100-50", "5"):
        with pytest.raises(ValueError, match="PAGEDSERVE_WS_GEMM"):
            _ws_gemm_range(bad)


def test_token_tiles_cover_every_batch_with_a_small_tail():
    from pagedserve.executor.kernels.ws_gemm import token_tiles

    assert token_tiles(1) == (16, 0) and token_tiles(16) == (16, 0) and token_tiles(17) == (32, 0)
    assert token_tiles(96) == (128, 0) and token_tiles(128) == (128, 0)
    assert token_tiles(129) == (128, 16) and token_tiles(144) == (128, 16) and token_tiles(145) == (128, 32)
    assert token_tiles(256) == (128, 128)
    for m in range(1, 257):
        bt, bt2 = token_tiles(m)
        assert bt + bt2 >= m and (bt2 == 0 or bt == 128) and bt2 <= 128
    with pytest.raises(ValueError):
        token_tiles(257)
