"""ModelRunner against Hugging Face: one mixed step (chunked prefill + prefix-cache hit + decodes of
different lengths) through the paged KV cache must give HF's full-sequence logits."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.executor.model_runner import (
    determine_num_blocks,
    kv_cache_bytes_per_block,
)
from tests.executor.helpers import (
    hf_logits,
    kv_rounded_to_fp8,
    make_runner,
    max_rel_err,
    save_tiny_model,
    scheduled,
    step,
)

BLOCK = 4  # prompt lengths below are deliberately not multiples of it


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "granite", "olmo2", "gpt_oss"])
@pytest.mark.parametrize("pad", [False, True], ids=["exact", "padded"])
def test_mixed_batch_matches_hf(arch: str, pad: bool, tmp_path) -> None:
    # pad: eager steps at padded token/logits counts, as on CUDA (padded_count)
    run_mixed_batch_against_hf(arch, tmp_path, "cpu", "torch", tolerance=1e-4, pad=pad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "olmo2", "gpt_oss"])
def test_mixed_batch_matches_hf_on_cuda(backend: str, arch: str, tmp_path) -> None:
    # The Triton kernels' fp32 tl.dot runs in TF32 (seen: ~5e-4 to 2e-3); the torch path gave 7e-7.
    tolerance = 5e-3 if backend == "triton" else 1e-4
    run_mixed_batch_against_hf(arch, tmp_path, "cuda", backend, tolerance=tolerance)


def run_mixed_batch_against_hf(arch: str, tmp_path, device: str, backend: str, tolerance: float,
                               pad: bool | None = None, quantization: str | None = None,
                               dtype: torch.dtype = torch.float32, kv_cache_dtype: str = "auto",
                               kv_scales: list[tuple[float, float]] | None = None,
                               kv_scale_style: str = "llm-compressor", reference_uses_scales: bool = True,
                               overrides: dict | None = None) -> None:
    """quantization="fp8": the reference is HF with its projections rounded to fp8 as the engine rounds them;
    kv_cache_dtype="fp8": HF with its keys (after rotary) and values rounded as the fp8 cache holds them;
    kv_scales: per layer (k, v) scales written into the checkpoint (kv_scale_style names them), which the engine
    uses as the powers of two at or above them (executor/kv_scales.py), and so does the reference.
    overrides: config fields of the tiny model (e.g. a sliding window)."""
    hf = save_tiny_model(arch, tmp_path, **(overrides or {}))
    if quantization == "fp8":
        from tests.executor.test_quantization import round_projections_to_fp8

        round_projections_to_fp8(hf)
    used = None
    if kv_scales is not None:
        from pagedserve.executor.kv_scales import power_of_two_at_least
        from tests.executor.helpers import write_kv_scales

        write_kv_scales(tmp_path, kv_scales, kv_scale_style)
        used = [(power_of_two_at_least(k, "k"), power_of_two_at_least(v if kv_scale_style != "kv" else k, "v"))
                for k, v in kv_scales]
    used = used if reference_uses_scales else None
    with kv_rounded_to_fp8(hf, used) if kv_cache_dtype != "auto" else contextlib.nullcontext():
        _run_mixed_batch(hf, tmp_path, device, backend, tolerance, pad, quantization, dtype, kv_cache_dtype, arch)


def _run_mixed_batch(hf, tmp_path, device, backend, tolerance, pad, quantization, dtype, kv_cache_dtype,
                     arch) -> None:
    runner, sampler = make_runner(tmp_path, block_size=BLOCK, num_blocks=24, device=device,
                                  attention_backend=backend, quantization=quantization, dtype=dtype,
                                  kv_cache_dtype=kv_cache_dtype)
    assert runner.backend.name == backend
    if pad is not None:
        runner.pad_eager_steps = pad
    seqs = {  # request id -> all its tokens so far
        "A": _prompt(1, 11),  # chunked prefill: 6 tokens in step 1, 5 in step 2
        "C": _prompt(2, 10),  # full prefill in step 1, then decodes
        "D": _prompt(3, 5),
        "E": _prompt(4, 13),
    }
    seqs["B"] = seqs["C"][:8] + _prompt(5, 3)  # shares C's first two (full) blocks
    blocks = {"A": [1, 2, 3], "C": [4, 5, 6], "D": [7, 8], "E": [9, 10, 11, 12, 14], "B": [4, 5, 13]}

    def check(step_logits: dict[str, torch.Tensor]) -> None:
        for rid, logits in step_logits.items():
            expected = hf_logits(hf, seqs[rid])[-1]
            assert max_rel_err(logits, expected) < tolerance, (arch, rid)

    # Step 1: A's first chunk (no sample), prefills of C, D, E.
    out = runner.execute(step(
        scheduled("A", seqs["A"][:6], 0, blocks["A"], needs_sample=False),
        scheduled("C", seqs["C"], 0, blocks["C"], needs_sample=True),
        scheduled("D", seqs["D"], 0, blocks["D"], needs_sample=True),
        scheduled("E", seqs["E"], 0, blocks["E"], needs_sample=True),
    ))
    assert out.sampled_token_ids[0] is None and None not in out.sampled_token_ids[1:]
    assert out.logprobs == [None] * 4
    check(sampler.logits[-1])
    for rid, token in zip("CDE", out.sampled_token_ids[1:]):
        seqs[rid].append(token)

    # Step 2, the mixed batch: A's last chunk, B computing only past the shared prefix, 3 decodes.
    out = runner.execute(step(
        scheduled("C", seqs["C"][-1:], 10, blocks["C"], needs_sample=True),
        scheduled("A", seqs["A"][6:], 6, blocks["A"], needs_sample=True),
        scheduled("D", seqs["D"][-1:], 5, blocks["D"], needs_sample=True),
        scheduled("B", seqs["B"][8:], 8, blocks["B"], needs_sample=True),
        scheduled("E", seqs["E"][-1:], 13, blocks["E"], needs_sample=True),
    ))
    assert set(sampler.logits[-1]) == {"A", "B", "C", "D", "E"}
    check(sampler.logits[-1])
    for rid, token in zip("CADBE", out.sampled_token_ids):
        seqs[rid].append(token)

    # Step 3: decode-only; E's new token (position 15) fills its 4th block, B decodes in block 13.
    out = runner.execute(step(
        scheduled("E", seqs["E"][-1:], 14, blocks["E"], needs_sample=True),
        scheduled("B", seqs["B"][-1:], 11, blocks["B"], needs_sample=True),
    ))
    check(sampler.logits[-1])


def test_prepare_inputs_layout(tmp_path) -> None:
    save_tiny_model("llama", tmp_path)
    runner, _ = make_runner(tmp_path, block_size=BLOCK, num_blocks=16)
    inputs = runner.prepare_inputs(step(
        scheduled("x", [5, 6, 7], 2, [3, 9], needs_sample=True),  # positions 2, 3, 4
        scheduled("y", [8], 0, [1], needs_sample=False),
        scheduled("z", [9], 6, [2, 4], needs_sample=True),  # position 6
    ))
    meta = inputs.ctx.attn_metadata
    assert inputs.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert inputs.positions.tolist() == [2, 3, 4, 0, 6]
    assert meta.slot_mapping.tolist() == [3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 1 * 4 + 0, 4 * 4 + 2]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5]
    assert meta.seq_lens.tolist() == [5, 1, 7]
    assert meta.block_tables.tolist() == [[3, 9], [1, 0], [2, 4]]
    assert meta.block_tables.dtype == torch.int32 and meta.seq_lens.dtype == torch.int32
    assert inputs.logits_indices.tolist() == [2, 4]
    assert (meta.max_query_len, meta.max_seq_len, meta.is_decode_only) == (3, 7, False)
    assert meta.query_lens_cpu == [3, 1, 1] and meta.seq_lens_cpu == [5, 1, 7]


def test_prepare_inputs_padded(tmp_path) -> None:
    """Eager steps padded to padded_count: extra tokens are id 0 at position 0 with slot -1, extra logits
    rows repeat the last real one; num_logits counts the real rows; decode-only steps stay exact."""
    from pagedserve.executor.model_runner import padded_count

    assert [padded_count(n) for n in (0, 1, 16, 17, 256, 257, 8192, 8193)] == [0, 16, 16, 32, 256, 320, 8192, 8448]
    save_tiny_model("llama", tmp_path)
    runner, _ = make_runner(tmp_path, block_size=BLOCK, num_blocks=16)
    runner.pad_eager_steps = True
    inputs = runner.prepare_inputs(step(
        scheduled("x", [5, 6, 7], 2, [3, 9], needs_sample=True),
        scheduled("y", [8], 0, [1], needs_sample=False),
        scheduled("z", [9], 6, [2, 4], needs_sample=True),
    ))
    meta = inputs.ctx.attn_metadata
    assert inputs.input_ids.tolist() == [5, 6, 7, 8, 9] + [0] * 11
    assert inputs.positions.tolist() == [2, 3, 4, 0, 6] + [0] * 11
    assert meta.slot_mapping.tolist() == [14, 15, 36, 4, 18] + [-1] * 11
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5] and meta.seq_lens.tolist() == [5, 1, 7]
    assert inputs.logits_indices.tolist() == [2, 4] + [4] * 14 and inputs.num_logits == 2
    decode = runner.prepare_inputs(step(scheduled("x", [1], 5, [3, 9], needs_sample=True)))
    assert decode.input_ids.tolist() == [1] and decode.logits_indices.tolist() == [0]


def test_too_few_blocks_is_an_error(tmp_path) -> None:
    save_tiny_model("llama", tmp_path)
    runner, _ = make_runner(tmp_path, block_size=BLOCK, num_blocks=16)
    with pytest.raises(ValueError, match="blocks cannot hold"):
        runner.prepare_inputs(step(scheduled("x", list(range(9)), 0, [1, 2], needs_sample=True)))


def test_num_blocks_on_cpu(tmp_path) -> None:
    hf = save_tiny_model("qwen2", tmp_path)
    # 2 layers x (K and V) x 4 tokens x 2 kv heads x 16 dims x 4 bytes
    assert kv_cache_bytes_per_block(hf.config, 4, torch.float32) == 2 * 2 * 4 * 2 * 16 * 4
    config = EngineConfig(model=str(tmp_path), cpu_kv_cache_gib=0.001, block_size=4)
    assert determine_num_blocks(config, None, hf.config, "cpu", torch.float32) == int(0.001 * 2**30) // 2048
    config = config.replace(num_kv_blocks=7)
    assert determine_num_blocks(config, None, hf.config, "cpu", torch.float32) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_num_blocks_from_cuda_memory_profile(tmp_path) -> None:
    from pagedserve.executor.loader import load_model

    save_tiny_model("qwen2", tmp_path)
    config = EngineConfig(model=str(tmp_path), load_format="dummy", gpu_memory_utilization=0.5,
                          max_num_batched_tokens=512)
    model, hf_config = load_model(config, str(tmp_path), "cuda", torch.bfloat16)
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    in_use = total - free  # this model, the CUDA context, and whatever earlier tests still hold
    num_blocks = determine_num_blocks(config, model, hf_config, "cuda", torch.bfloat16, 512)
    per_block = kv_cache_bytes_per_block(hf_config, config.block_size, torch.bfloat16)
    # Half the device minus what is in use goes to blocks, less a small activation peak; no more.
    budget = 0.5 * total - in_use
    assert budget - 2**30 < num_blocks * per_block <= budget
