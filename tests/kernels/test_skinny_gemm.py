"""Skinny GEMM (y = x @ W^T + bias, 1 <= M <= 256) vs an fp32 torch reference.

Interpreter on CPU (fp32/fp16, small shapes), compiled on CUDA (fp16/bf16, plus 7B shapes); see
conftest.py. Fresh random inputs per case; `out` is poisoned with NaN so an unwritten element fails.
The configs below force each code path: tensor-core (dot) and CUDA-core (fma; M == 1 has its own
branch) inner products, unsplit and split-K (partials + reduce), K and N not multiples of the blocks;
for M > 8 (dot only) several m-tiles (block_m 16..256, M not a multiple of block_m).
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels import skinny_gemm
from pagedserve.executor.kernels.skinny_gemm import MAX_M, SkinnyConfig, default_config, skinny_linear

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
# Relative to the largest |reference| value: fp32 sums in another order, or one output rounding.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")

CASES = [  # (K, N, bias, config); SkinnyConfig(block_n, block_k, num_warps, num_stages, split_k, use_dot)
    pytest.param(72, 17, True, SkinnyConfig(16, 32, 2, 2, 1, True), id="dot-K72-N17-bias"),
    pytest.param(200, 300, False, SkinnyConfig(32, 64, 4, 2, 3, True), id="dot-split-K200-N300"),
    pytest.param(200, 1, True, SkinnyConfig(16, 32, 2, 2, 4, True), id="dot-split-K200-N1-bias"),
    pytest.param(72, 300, True, SkinnyConfig(64, 32, 4, 2, 1, False), id="fma-K72-N300-bias"),
    pytest.param(256, 17, True, SkinnyConfig(4, 64, 2, 2, 3, False), id="fma-split-K256-N17-bias"),
    pytest.param(200, 1, False, SkinnyConfig(2, 16, 1, 1, 5, False), id="fma-split-K200-N1"),
    pytest.param(256, 40, True, None, id="default-K256-N40-bias"),
]

# M > 8: dot only, m-tiles. SkinnyConfig(block_n, block_k, num_warps, num_stages, split_k, use_dot, block_m)
LARGE_M_CASES = [  # (K, N, bias, config)
    pytest.param(72, 17, True, SkinnyConfig(16, 32, 2, 2, 1, True, 16), id="m16-K72-N17-bias"),
    pytest.param(200, 70, False, SkinnyConfig(32, 64, 4, 2, 3, True, 32), id="m32-split-K200-N70"),
    pytest.param(96, 40, True, SkinnyConfig(16, 32, 2, 2, 2, True, 64), id="m64-split-K96-N40-bias"),
    pytest.param(130, 33, True, SkinnyConfig(32, 16, 4, 2, 1, True, 128), id="m128-K130-N33-bias"),
    pytest.param(64, 48, False, SkinnyConfig(16, 64, 4, 2, 1, True, 256), id="m256-K64-N48"),
    pytest.param(256, 40, True, None, id="default-K256-N40-bias"),
]


# The TMA path (bulk tensor copies, zero-filled past the tensor's edges): 16-bit operands only, row
# strides a multiple of 16 bytes (K % 8 == 0). SkinnyConfig(..., block_m, use_tma=True).
TMA_CASES = [  # (K, N, bias, config)
    pytest.param(72, 17, True, SkinnyConfig(16, 32, 2, 2, 1, True, 16, True), id="tma-m16-K72-N17-bias"),
    pytest.param(200, 70, False, SkinnyConfig(32, 64, 4, 3, 3, True, 32, True), id="tma-m32-split-K200-N70"),
    pytest.param(96, 40, True, SkinnyConfig(16, 32, 4, 2, 2, True, 64, True), id="tma-m64-split-K96-N40-bias"),
    pytest.param(136, 33, True, SkinnyConfig(64, 16, 4, 4, 1, True, 128, True), id="tma-m128-K136-N33-bias"),
    # Two token tiles a program (block_m + block_m_tail rows): M = 130 in one m-tile of 128 + 16, M = 33 in
    # 16 + 16 and then 16 + 16 more (the second tile's rows past M zero-filled), split K with a bias.
    pytest.param(136, 33, True, SkinnyConfig(64, 16, 4, 4, 1, True, 128, True, 16), id="tma-m128+16-K136-N33-bias"),
    pytest.param(200, 70, True, SkinnyConfig(32, 64, 4, 3, 3, True, 16, True, 16), id="tma-m16+16-split-K200-N70-bias"),
    pytest.param(96, 40, False, SkinnyConfig(16, 32, 4, 2, 1, True, 64, True, 32), id="tma-m64+32-K96-N40"),
]
TMA_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def reference(x, weight, bias):
    ref = x.float() @ weight.float().T
    return ref + bias.float() if bias is not None else ref


def assert_matches(out, ref, dtype, x=None, weight=None):
    """Within TOL of the largest |reference| value, or, given x and weight, of the largest sum of
    |x| |W| terms (fp32 sums that cancel to a small result keep the rounding of their terms)."""
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "an output element was left unwritten (NaN poison survived)"
    scale = ref.abs().max().item() or 1.0
    if x is not None:
        scale = max(scale, (x.float().abs() @ weight.float().abs().T).max().item())
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def make_inputs(m, k, n, with_bias, dtype):
    x = torch.randn(m, k).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k) / k**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(n).to(dtype).to(DEVICE) if with_bias else None
    return x, weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,with_bias,config", CASES)
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_skinny_linear(m, k, n, with_bias, config, dtype):
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = skinny_linear(x, weight, bias, out=out, config=config)
    assert got is out
    assert_matches(out, reference(x, weight, bias), dtype, x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,with_bias,config", LARGE_M_CASES)
@pytest.mark.parametrize("m", [9, 16, 17, 33, 64, 130])
def test_skinny_linear_large_m(m, k, n, with_bias, config, dtype):
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    got = skinny_linear(x, weight, bias, out=out, config=config)
    assert got is out
    assert_matches(out, reference(x, weight, bias), dtype, x, weight)


@pytest.mark.parametrize("dtype", TMA_DTYPES)
@pytest.mark.parametrize("k,n,with_bias,config", TMA_CASES)
@pytest.mark.parametrize("m", [9, 33, 130])
def test_skinny_linear_tma(m, k, n, with_bias, config, dtype):
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    assert skinny_linear(x, weight, bias, out=out, config=config) is out
    assert_matches(out, reference(x, weight, bias), dtype, x, weight)


def test_tail_tile_validation():
    with pytest.raises(ValueError, match="block_m_tail"):
        SkinnyConfig(64, 64, 4, 3, 1, True, 128, False, 16).validate()  # needs use_tma
    for tail in (8, 24, 256):  # below 16, not a power of 2, above block_m
        with pytest.raises(ValueError, match="block_m_tail"):
            SkinnyConfig(64, 64, 4, 3, 1, True, 128, True, tail).validate()
    SkinnyConfig(64, 64, 4, 3, 1, True, 128, True, 16).validate()


def test_a_two_tile_entry_sizes_its_tail_per_m(monkeypatch):
    """A SKINNY_CONFIGS entry with block_m_tail serves its whole bucket: the tail follows M past block_m."""
    entry = dict(block_n=16, block_k=32, num_warps=4, num_stages=2, split_k=1, use_dot=True, block_m=128,
                 use_tma=True, block_m_tail=16)
    monkeypatch.setitem(skinny_gemm.SKINNY_CONFIGS, (33, 72, 256), entry)
    ms = (129, 144, 145, 160, 161, 200, 256)
    tails = {m: skinny_gemm.choose_config(m, 33, 72, torch.float16, DEVICE).block_m_tail for m in ms}
    assert tails == {129: 16, 144: 16, 145: 32, 160: 32, 161: 64, 200: 128, 256: 128}
    assert skinny_gemm.fit_tail(SkinnyConfig(**entry), 100).block_m_tail == 0  # block_m holds M
    for m in (130, 161):  # and the chosen configs compute the product
        x, weight, bias = make_inputs(m, 72, 33, True, torch.float16)
        out = torch.full((m, 33), float("nan"), dtype=torch.float16, device=DEVICE)
        skinny_linear(x, weight, bias, out=out)
        assert_matches(out, reference(x, weight, bias), torch.float16, x, weight)


def test_tma_rejects_what_the_copy_engine_cannot_read():
    config = SkinnyConfig(16, 32, 2, 2, 1, True, 16, True)
    x, weight, _ = make_inputs(9, 36, 8, False, torch.float16)  # rows of 72 bytes: not a 16-byte multiple
    with pytest.raises(ValueError, match="16-byte"):
        skinny_linear(x, weight, config=config)
    x, weight, _ = make_inputs(9, 64, 8, False, torch.float32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        skinny_linear(x, weight, config=config)
    with pytest.raises(ValueError, match="use_dot"):
        SkinnyConfig(16, 32, 2, 2, 1, False, 16, True).validate()


def test_max_m_and_default_config():
    """M = 256 (the largest) through the heuristic's config, and as 16 m-tiles of 16 rows."""
    dtype, m, k, n = DTYPES[0], MAX_M, 64, 24
    x, weight, bias = make_inputs(m, k, n, True, dtype)
    assert_matches(skinny_linear(x, weight, bias), reference(x, weight, bias), dtype)
    config = SkinnyConfig(16, 64, 2, 2, 1, True, 16)
    assert_matches(skinny_linear(x, weight, bias, config=config), reference(x, weight, bias), dtype)


@pytest.mark.parametrize("use_dot,m", [(True, 3), (False, 3), (True, 20)])
def test_strided_x_and_out_and_allocated_out(use_dot, m):
    """x and out as row slices of wider buffers (row stride != K / N); out=None allocates."""
    dtype, k, n = DTYPES[0], 96, 40
    x_wide = torch.randn(m, k + 24).to(dtype).to(DEVICE)
    x = x_wide[:, 8 : 8 + k]
    weight = torch.randn(n, k).to(dtype).to(DEVICE) / k**0.5
    out_wide = torch.full((m, n + 16), float("nan"), dtype=dtype, device=DEVICE)
    config = {"block_n": 16, "block_k": 32, "num_warps": 2, "num_stages": 2, "split_k": 2, "use_dot": use_dot}
    skinny_linear(x, weight, out=out_wide[:, :n], config=config)
    assert_matches(out_wide[:, :n], reference(x, weight, None), dtype)
    assert torch.isnan(out_wide[:, n:]).all(), "wrote outside out"
    assert_matches(skinny_linear(x, weight), reference(x, weight, None), dtype)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 9, 16, 33, 64, 100, 128, 139, 256])
@pytest.mark.parametrize(
    "n,k",
    [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584), (1152, 896), (896, 4864)],
)
def test_default_configs_are_valid(m, n, k):
    """The heuristic for Qwen2-7B / 0.5B shapes: legal configs; split-K only where the tiles are too few."""
    config = default_config(m, n, k, torch.bfloat16, num_sms=132)
    config.validate()
    assert k % config.block_k == 0  # these K all take the unmasked path
    m_tiles = triton_cdiv(m, config.block_m) if config.use_dot else 1
    if config.split_k > 1:
        assert triton_cdiv(n, config.block_n) * m_tiles < 2 * 132
    if m > 8:
        assert config.use_dot and 16 <= config.block_m <= 128 and config.block_n in (64, 128)
        assert config.num_warps == config.block_n // 16  # one warpgroup of 4 warps per 64 rows of W
        assert (config.block_n + config.block_m) * config.block_k * 2 * config.num_stages <= 200 * 1024
        assert config.num_stages >= 3
        if config.split_k > 1:  # the fp32 partials (written + read) stay <= 1/4 of W's bytes
            assert 8 * config.split_k * m * n <= 2 * n * k / 4


def triton_cdiv(a, b):
    return -(-a // b)


def test_fma_entry_is_skipped_above_m8(monkeypatch):
    """A SKINNY_CONFIGS (N, K) entry for every M that is fma serves M <= 8 only; M > 8 gets a dot config."""
    fma = dict(block_n=4, block_k=64, num_warps=2, num_stages=2, split_k=1, use_dot=False)
    monkeypatch.setitem(skinny_gemm.SKINNY_CONFIGS, (40, 64), fma)
    assert skinny_gemm.choose_config(4, 40, 64, torch.float32, DEVICE) == SkinnyConfig(**fma)
    assert skinny_gemm.choose_config(9, 40, 64, torch.float32, DEVICE).use_dot


def test_bad_inputs_raise():
    x = torch.randn(2, 64).to(DEVICE)
    weight = torch.randn(32, 64).to(DEVICE)
    with pytest.raises(ValueError, match="M <= 256"):
        skinny_linear(torch.randn(257, 64).to(DEVICE), weight)
    with pytest.raises(ValueError, match="fma path"):
        skinny_linear(torch.randn(9, 64).to(DEVICE), weight, config=SkinnyConfig(16, 32, use_dot=False))
    with pytest.raises(ValueError, match="block_m"):
        skinny_linear(x, weight, config=SkinnyConfig(16, 32, block_m=8))
    with pytest.raises(ValueError, match="block_m"):
        skinny_linear(x, weight, config=SkinnyConfig(16, 32, block_m=512))
    with pytest.raises(ValueError, match="power of 2"):
        skinny_linear(x, weight, config=SkinnyConfig(16, 32, block_m=48))
    with pytest.raises(ValueError, match="1 <= M"):
        skinny_linear(torch.randn(0, 64).to(DEVICE), weight)
    with pytest.raises(ValueError, match="do not match"):
        skinny_linear(torch.randn(2, 65).to(DEVICE), weight)
    with pytest.raises(ValueError, match="dtype"):
        skinny_linear(x.half(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(x, torch.randn(64, 64).to(DEVICE).T)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, weight, bias=torch.randn(31).to(DEVICE))
    with pytest.raises(ValueError, match="out"):
        skinny_linear(x, weight, out=torch.empty(2, 32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="power of 2"):
        skinny_linear(x, weight, config=SkinnyConfig(24, 32))
    with pytest.raises(ValueError, match="use_dot"):
        skinny_linear(x, weight, config=SkinnyConfig(8, 32, use_dot=True))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k,with_bias", [(4608, 3584, True), (3584, 18944, False), (1152, 896, True)])
def test_gpu_model_shapes_default_config(m, n, k, with_bias, dtype):
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    skinny_linear(x, weight, bias, out=out)
    assert_matches(out, reference(x, weight, bias), dtype, x, weight)


@gpu_only
@pytest.mark.parametrize(
    "m,config,repeats",
    [(4, SkinnyConfig(16, 256, 4, 3, 8, True), 5), (100, SkinnyConfig(64, 128, 4, 3, 4, True, 64), 3)],
    ids=["m4-split8", "m100-m64-split4"],
)
def test_gpu_split_k_is_deterministic_and_graph_capturable(m, config, repeats):
    k, n, dtype = 18944, 3584, torch.bfloat16
    x, weight, bias = make_inputs(m, k, n, True, dtype)
    first = skinny_linear(x, weight, bias, config=config)
    assert_matches(first, reference(x, weight, bias), dtype)
    assert all(torch.equal(first, skinny_linear(x, weight, bias, config=config)) for _ in range(repeats))
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skinny_linear(x, weight, bias, out=out, config=config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


SHAPES_7B = [  # (N, K, bias): qkv, o, gate_up, down
    pytest.param(4608, 3584, True, id="qkv"),
    pytest.param(3584, 3584, False, id="o"),
    pytest.param(37888, 3584, False, id="gate_up"),
    pytest.param(3584, 18944, False, id="down"),
]


@gpu_only
@pytest.mark.parametrize("m", [16, 64, 139, 256])
@pytest.mark.parametrize("n,k,with_bias", SHAPES_7B)
@pytest.mark.parametrize(
    "config",
    [
        None,
        SkinnyConfig(64, 128, 4, 4, 1, True, 64),
        SkinnyConfig(128, 64, 8, 3, 1, True, 128),
        SkinnyConfig(64, 64, 8, 3, 3, True, 256),
    ],
    ids=["default", "m64-n64-k128", "m128-n128-k64", "m256-split3"],
)
def test_gpu_large_m_model_shapes(m, n, k, with_bias, config):
    dtype = torch.bfloat16
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    skinny_linear(x, weight, bias, out=out, config=config)
    assert_matches(out, reference(x, weight, bias), dtype, x, weight)


ENTRIES = sorted((key, cfg) for key, cfg in skinny_gemm.SKINNY_CONFIGS.items() if len(key) == 3)


def entry_ms(bucket: int) -> list[int]:
    """The M at both ends of an entry's bucket (the model runs it for M in bucket/2+1 .. bucket)."""
    return sorted({bucket // 2 + 1, bucket}) if bucket > 1 else [1]


@pytest.mark.parametrize("key,entry", ENTRIES, ids=[f"N{n}-K{k}-M{b}" for (n, k, b), _ in ENTRIES])
def test_every_measured_entry_at_small_shapes(key, entry):
    """Each SKINNY_CONFIGS entry's exact config (tiles, stages, split) at both ends of its bucket, on a small
    N and K that is not a multiple of its blocks (interpreter on CPU: the shapes the config meets in the model
    are GPU-only, below)."""
    config = SkinnyConfig(**entry)
    dtype = torch.float16
    for m in entry_ms(key[2]):
        x, weight, bias = make_inputs(m, 3 * config.block_k + 40, 2 * config.block_n + 5, True, dtype)
        out = torch.full((m, weight.shape[0]), float("nan"), dtype=dtype, device=DEVICE)
        skinny_linear(x, weight, bias, out=out, config=config)
        assert_matches(out, reference(x, weight, bias), dtype, x, weight)


@gpu_only
@pytest.mark.parametrize("key", [key for key, _ in ENTRIES], ids=[f"N{n}-K{k}-M{b}" for (n, k, b), _ in ENTRIES])
def test_gpu_every_measured_entry_at_its_shape(key):
    """What the model runs: each entry chosen by choose_config at its own (N, K) and both ends of its bucket."""
    n, k, bucket = key
    dtype = torch.bfloat16
    for m in entry_ms(bucket):
        x, weight, bias = make_inputs(m, k, n, n == 4608, dtype)
        assert skinny_gemm.has_measured_config(m, n, k)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        skinny_linear(x, weight, bias, out=out)
        assert_matches(out, reference(x, weight, bias), dtype, x, weight)


@gpu_only
def test_gpu_m_is_not_specialized():
    """Batch sizes 16, 17, 33, 48 (and 2) share one compiled variant of a config (M is do_not_specialize)."""
    kernel = skinny_gemm._skinny_gemm_kernel
    try:
        cache = kernel.device_caches[torch.cuda.current_device()][0]
    except (AttributeError, KeyError, IndexError, TypeError):
        pytest.skip("this Triton version keeps its kernel cache elsewhere")
    k, n, dtype = 256, 128, torch.bfloat16
    x_all, weight, _ = make_inputs(48, k, n, False, dtype)
    out_all = torch.empty(48, n, dtype=dtype, device=DEVICE)
    config = SkinnyConfig(64, 64, 4, 3, 1, True, 16)
    skinny_linear(x_all[:16], weight, out=out_all[:16], config=config)
    variants = len(cache)
    for m in (17, 33, 48, 2):
        skinny_linear(x_all[:m], weight, out=out_all[:m], config=config)
        assert_matches(out_all[:m], reference(x_all[:m], weight, None), dtype)
    assert len(cache) == variants


@pytest.mark.parametrize("dtype", DTYPES[-1:])
@pytest.mark.parametrize("k,n,with_bias,config", [CASES[3], CASES[4], CASES[0], CASES[6]])
@pytest.mark.parametrize("m", [1, 5])
def test_fp32_output_keeps_the_accumulator(m, k, n, with_bias, config, dtype):
    """out_dtype=float32 (the batch-1 LM head): fp32 results of the fp32 sums, no rounding to x's dtype."""
    torch.manual_seed(m * 31 + n)
    x, weight, bias = make_inputs(m, k, n, with_bias, dtype)
    out = skinny_linear(x, weight, bias, config=config, out_dtype=torch.float32)
    ref = reference(x, weight, bias)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)  # fp32 tolerance, whatever x's dtype
    poisoned = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    skinny_linear(x, weight, bias, out=poisoned, config=config)
    torch.testing.assert_close(poisoned, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out_dtype"):
        skinny_linear(x, weight, bias, out_dtype=torch.int32)
