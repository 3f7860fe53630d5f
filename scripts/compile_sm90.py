"""Compiles Triton kernels for sm_90 on a machine without a GPU (Triton's frontend, its passes and
ptxas all run on the CPU): catches compile errors the interpreter does not see (e.g. None passed to a
nested jit function, a TMA block the copy engine cannot take) before a device call, and says whether
the tensor-core path is there (wgmma in the PTX) and whether TMA copies are (cp.async.bulk.tensor).
The local Triton may differ from the GPU's.

    python scripts/compile_sm90.py [sample] [filter] [penalties] [tma] [decode] [qkv] [norm] [kvfp8] [lora] [moe] [w4]
"""
from __future__ import annotations

import sys

import triton

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, sig: dict, consts: dict, label: str, num_warps: int = 4, num_stages: int = 3) -> None:
    src = ASTSource(fn, sig, constexprs=consts)
    try:
        k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
        print(f"{label}: {type(e).__name__}: {str(e)[-1500:]}")
        return
    ptx = k.asm.get("ptx", "")
    fp8 = (f", e4m3 cvt {ptx.count('e4m3x2')}, cvt.bf16.f16 {ptx.count('cvt.bf16.f16')}, byte smem loads "
           f"{ptx.count('ld.shared.b8')}" if "e4m3" in ptx else "")
    print(f"{label}: compiled; wgmma {ptx.count('wgmma.mma_async')}, tma {ptx.count('cp.async.bulk.tensor')}, "
          f"shared {k.metadata.shared} B{fp8}, regs n/a on CPU")


def sample() -> None:
    from pagedserve.executor.kernels import sample as m

    for split, has_thr in ((True, False), (False, False), (True, True)):
        sig = {"logits_ptr": "*fp32", "temps_ptr": "*fp64", "thr_ptr": "*fp32", "seeds_ptr": "*i64",
               "offsets_ptr": "*i64", "out_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32",
               "num_rows": "i32", "stride_row": "i32", "vocab": "i32", "chunk": "i32", "num_splits": "i32",
               "ROWS": "constexpr", "TILE": "constexpr", "SPLIT": "constexpr", "HAS_THR": "constexpr",
               "USE_PDL": "constexpr"}
        consts = {"ROWS": 1, "TILE": 1024, "SPLIT": split, "HAS_THR": has_thr, "USE_PDL": True}
        build(m._sample_gumbel_kernel, sig, consts, f"sample split={split} thresholds={has_thr}")


def sample_filter() -> None:
    from pagedserve.executor.kernels import sample_filter as m

    sig = {"logits_ptr": "*fp32", "temps_ptr": "*fp64", "top_k_ptr": "*i64", "top_p_ptr": "*fp64",
           "min_p_ptr": "*fp64", "out_ptr": "*fp32", "scratch_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32",
           "hist_ptr": "*i32", "stride_row": "i32", "vocab": "i32", "chunk": "i32", "num_programs": "i32",
           "TILE": "constexpr", "P": "constexpr", "C": "constexpr", "MAX_PASSES": "constexpr", "NB": "constexpr",
           "LEVELS": "constexpr", "RADIX": "constexpr", "USE_PDL": "constexpr"}
    for radix in (True, False):
        consts = {"TILE": m.TILE, "P": m.PIVOTS, "C": m.MAX_PROGRAMS_PER_ROW, "MAX_PASSES": m.MAX_PASSES,
                  "NB": m.HIST_BINS, "LEVELS": m.HIST_LEVELS, "RADIX": radix, "USE_PDL": True}
        build(m._filter_threshold_kernel, sig, consts, f"sample_filter radix={radix}", num_warps=1)


def penalties() -> None:
    from pagedserve.executor.kernels import penalties as m

    for has_prompt in (True, False):
        sig = {"logits_ptr": "*fp32", "stride_l": "i32", "rows_ptr": "*i64", "slots_ptr": "*i64",
               "counts_ptr": "*i32", "prompt_ptr": "*u8" if has_prompt else "*i32", "stride_c": "i32",
               "knobs_ptr": "*fp32", "num_rows": "i32", "vocab": "i32", "num_col_blocks": "i32",
               "HAS_PROMPT": "constexpr", "BLOCK": "constexpr"}
        build(m._penalties_kernel, sig, {"HAS_PROMPT": has_prompt, "BLOCK": m.BLOCK}, f"penalties prompt={has_prompt}",
              num_warps=8)


def tma() -> None:
    from bench_skinny_gemm import LARGE_M_TMA_TILES, TAIL_TMA_TILES

    from pagedserve.executor.kernels import skinny_gemm as m

    tiles = [(bm, 0, bn, bk, w, st) for bm, bn, bk, w, st in LARGE_M_TMA_TILES]
    tiles += [(128, 16, bn, bk, w, st) for bn, bk, w, st in TAIL_TMA_TILES]
    for block_m, tail, block_n, block_k, warps, stages in tiles:
        for bias, out in ((True, "*bf16"), (False, "*fp32")):
            sig = {"w_desc": f"tensordesc<bf16[{block_n}, {block_k}]>",
                   "x_desc": f"tensordesc<bf16[{block_m}, {block_k}]>",
                   "xt_desc": f"tensordesc<bf16[{tail or block_m}, {block_k}]>",
                   "bias_ptr": "*bf16", "out_ptr": out, "M": "i32", "N": "i32", "stride_os": "i32",
                   "stride_om": "i32", "k_per_split": "i32", "K": "i32",
                   "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                   "NUM_STAGES": "constexpr", "BLOCK_MT": "constexpr", "USE_PDL": "constexpr"}
            consts = {"HAS_BIAS": bias, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                      "NUM_STAGES": stages, "BLOCK_MT": tail, "USE_PDL": True}
            build(m._tma_gemm_kernel, sig, consts, f"tma m{block_m}+{tail} n{block_n} k{block_k} w{warps} s{stages} "
                  f"{'bias' if bias else 'split'}", num_warps=warps, num_stages=stages)


def decode() -> None:
    from pagedserve.executor.kernels import paged_attention_decode as m

    ptrs = ["q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr",
            "query_start_loc_ptr", "seq_order_ptr", "part_out_ptr", "part_lse_ptr", "work_ptr", "counter_ptr",
            "sinks_ptr"]
    types = ["*bf16", "*bf16", "*bf16", "*bf16", "*i32", "*i32", "*i32", "*i32", "*fp32", "*fp32", "*i32", "*i32",
             "*fp32"]
    ints = ["stride_w", "qk_scale", "num_splits", "window", "softcap_l", "stride_q_tok", "stride_q_head",
            "stride_o_tok", "stride_o_head", "stride_bt_seq", "stride_c_block", "stride_c_slot", "stride_c_head"]
    for work, ordered, windowed in ((True, False, False), (False, True, False), (False, True, True)):
        sig = dict(zip(ptrs, types)) | {n: ("fp32" if n in ("qk_scale", "softcap_l") else "i32") for n in ints}
        consts = {"NUM_HEADS": 28, "QUERIES_PER_KV": 7, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_G": 16,
                  "BLOCK_N": 64, "BLOCK_SIZE": 16, "SPLIT": windowed, "MIXED": False, "ORDERED": ordered,
                  "WORK": work, "WINDOWED": windowed, "SOFTCAP": windowed, "HAS_SINKS": windowed, "USE_PDL": True}
        sig |= {k: "constexpr" for k in consts}
        label = f"decode work={work} ordered={ordered} window+softcap+sinks={windowed}"
        build(m._paged_decode_kernel, sig, consts, label, num_warps=2, num_stages=3)
    from pagedserve.executor.kernels import paged_attention_prefill as p

    names = ["q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr",
             "query_start_loc_ptr", "sinks_ptr", "qk_scale", "num_seqs", "window", "softcap_l", "stride_q_tok",
             "stride_q_head", "stride_o_tok", "stride_o_head", "stride_bt_seq", "stride_c_block", "stride_c_slot",
             "stride_c_head"]
    types = ["*bf16"] * 4 + ["*i32"] * 3 + ["*fp32", "fp32", "i32", "i32", "fp32"] + ["i32"] * 8
    for windowed in (False, True):
        consts = {"QUERIES_PER_KV": 7, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_Q": 8, "BLOCK_N": 64,
                  "BLOCK_SIZE": 16, "SKIP_DECODES": True, "WINDOWED": windowed, "SOFTCAP": windowed,
                  "HAS_SINKS": windowed, "USE_PDL": True}
        build(p._paged_prefill_kernel, dict(zip(names, types)) | {k: "constexpr" for k in consts}, consts,
              f"prefill window+softcap+sinks={windowed}", num_warps=4, num_stages=2)


def kvfp8() -> None:
    """fp8 KV caches (kv_cache_dtype="fp8"): the three writers and both attention kernels at the 7B shapes."""
    from pagedserve.executor.kernels import kv_cache_write, paged_attention_decode, paged_attention_prefill
    from pagedserve.executor.kernels import qkv_rope_kv as qkv_m
    from pagedserve.executor.kernels import rotary_kv_write as rot

    c = "*fp8e4nv"
    ptrs = ["q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr",
            "query_start_loc_ptr", "seq_order_ptr", "part_out_ptr", "part_lse_ptr", "work_ptr", "counter_ptr",
            "sinks_ptr"]
    types = ["*bf16", "*bf16", c, c, "*i32", "*i32", "*i32", "*i32", "*fp32", "*fp32", "*i32", "*i32", "*fp32"]
    ints = ["stride_w", "qk_scale", "num_splits", "window", "softcap_l", "stride_q_tok", "stride_q_head",
            "stride_o_tok", "stride_o_head", "stride_bt_seq", "stride_c_block", "stride_c_slot", "stride_c_head"]
    sig = dict(zip(ptrs, types)) | {n: ("fp32" if n in ("qk_scale", "softcap_l") else "i32") for n in ints}
    consts = {"NUM_HEADS": 28, "QUERIES_PER_KV": 7, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_G": 16, "BLOCK_N": 64,
              "BLOCK_SIZE": 16, "SPLIT": True, "MIXED": False, "ORDERED": False, "WORK": True, "WINDOWED": False,
              "SOFTCAP": False, "HAS_SINKS": False, "USE_PDL": True}
    build(paged_attention_decode._paged_decode_kernel, sig | {k: "constexpr" for k in consts}, consts,
          "decode fp8 cache", num_warps=2, num_stages=3)
    names = ["q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr",
             "query_start_loc_ptr", "sinks_ptr", "qk_scale", "num_seqs", "window", "softcap_l", "stride_q_tok",
             "stride_q_head", "stride_o_tok", "stride_o_head", "stride_bt_seq", "stride_c_block", "stride_c_slot",
             "stride_c_head"]
    types = ["*bf16", "*bf16", c, c, "*i32", "*i32", "*i32", "*fp32", "fp32", "i32", "i32", "fp32"] + ["i32"] * 8
    consts = {"QUERIES_PER_KV": 7, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_Q": 8, "BLOCK_N": 64,
              "BLOCK_SIZE": 16, "SKIP_DECODES": False, "WINDOWED": False, "SOFTCAP": False, "HAS_SINKS": False,
              "USE_PDL": True}
    build(paged_attention_prefill._paged_prefill_kernel, dict(zip(names, types)) | {k: "constexpr" for k in consts},
          consts, "prefill fp8 cache", num_warps=4, num_stages=2)
    names = ["key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr", "slot_mapping_ptr", "stride_k_tok",
             "stride_k_head", "stride_v_tok", "stride_v_head", "stride_c_block", "stride_c_slot", "stride_c_head"]
    types = ["*bf16", "*bf16", c, c, "*i64"] + ["i32"] * 7
    consts = {"NUM_KV_HEADS": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_H": 4, "BLOCK_D": 128, "USE_PDL": True}
    build(kv_cache_write._kv_cache_write_kernel, dict(zip(names, types)) | {k: "constexpr" for k in consts}, consts,
          "kv_cache_write fp8 cache")
    names = ["q_ptr", "k_ptr", "v_ptr", "positions_ptr", "cos_sin_ptr", "k_cache_ptr", "v_cache_ptr",
             "slot_mapping_ptr", "stride_q_tok", "stride_q_head", "stride_k_tok", "stride_k_head", "stride_v_tok",
             "stride_v_head", "stride_cs", "stride_c_block", "stride_c_slot", "stride_c_head", "num_q_heads",
             "num_slots"]
    types = ["*bf16", "*bf16", "*bf16", "*i64", "*fp32", c, c, "*i64"] + ["i32"] * 12
    consts = {"NUM_KV_HEADS": 4, "HALF": 64, "BLOCK_SIZE": 16, "BLOCK_HQ": 32, "BLOCK_HK": 4, "BLOCK_HALF": 64,
              "USE_PDL": True}
    build(rot._rotary_kv_write_kernel, dict(zip(names, types)) | {k: "constexpr" for k in consts}, consts,
          "rotary_kv_write fp8 cache")
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": "*bf16", "positions_ptr": "*i64",
           "cos_sin_ptr": "*fp32", "k_cache_ptr": c, "v_cache_ptr": c, "slot_mapping_ptr": "*i64",
           "K": "i32", "stride_wn": "i32", "stride_cs": "i32", "stride_c_block": "i32", "stride_c_slot": "i32",
           "stride_c_head": "i32", "num_q_heads": "i32"}
    consts = {"NUM_KV_HEADS": 4, "HALF": 64, "BLOCK_SIZE": 16, "HAS_BIAS": True, "EVEN_K": True,
              "BLOCK_R": qkv_m.DEFAULT_BLOCK_R, "BLOCK_K": qkv_m.DEFAULT_BLOCK_K, "USE_PDL": True}
    build(qkv_m._qkv_rope_kv_kernel, sig | {k: "constexpr" for k in consts}, consts, "qkv_rope_kv fp8 cache",
          num_warps=4, num_stages=2)


def qkv() -> None:
    """The batch-1 qkv GEMV with rotary and the KV write (kernels/qkv_rope_kv.py) at the 7B shapes."""
    from pagedserve.executor.kernels import qkv_rope_kv as m

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": "*bf16", "positions_ptr": "*i64",
           "cos_sin_ptr": "*fp32", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64",
           "K": "i32", "stride_wn": "i32", "stride_cs": "i32", "stride_c_block": "i32", "stride_c_slot": "i32",
           "stride_c_head": "i32", "num_q_heads": "i32"}
    consts = {"NUM_KV_HEADS": 4, "HALF": 64, "BLOCK_SIZE": 16, "HAS_BIAS": True, "EVEN_K": True,
              "BLOCK_R": m.DEFAULT_BLOCK_R, "BLOCK_K": m.DEFAULT_BLOCK_K, "USE_PDL": True}
    sig |= {k: "constexpr" for k in consts}
    build(m._qkv_rope_kv_kernel, sig, consts, "qkv_rope_kv 7B", num_warps=4, num_stages=2)


def norm() -> None:
    """The RMSNorm kernel (fused_norm.py), with and without the residual (session 8: a variant that the CPU's
    Triton accepted failed to compile on the GPU's Triton 3.6; run this with Triton 3.6 too)."""
    from pagedserve.executor.kernels import fused_norm as m

    for has_res, gemma in ((True, False), (False, False), (True, True)):
        sig = {"x_ptr": "*bf16", "residual_ptr": "*fp32", "weight_ptr": "*bf16", "out_ptr": "*bf16",
               "residual_out_ptr": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "stride_ro": "i32",
               "hidden": "i32", "eps": "fp32"}
        consts = {"HAS_RESIDUAL": has_res, "BLOCK": 4096, "GEMMA": gemma, "USE_PDL": True}
        sig |= {k: "constexpr" for k in consts}
        build(m._rms_norm_kernel, sig, consts, f"rms_norm residual={has_res} gemma={gemma}", num_warps=8)


def lora() -> None:
    from pagedserve.executor.kernels import lora_sgmv as m

    for dtype in ("bf16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for bm, br in ((16, 64), (16, 16), (64, 32)):
            sig = {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "order_ptr": "*i64", "starts_ptr": "*i64",
                   "h_ptr": "*fp32", "K": "i32", "RT": "i32", "k_per_split": "i32", "stride_xm": "i32",
                   "stride_am": "i32", "stride_hs": "i32", "stride_hm": "i32", "NUM_SLOTS": "constexpr",
                   "S_POW2": "constexpr", "BM": "constexpr", "BR": "constexpr", "BK": "constexpr",
                   "DOT_PRECISION": "constexpr", "USE_PDL": "constexpr"}
            consts = {"NUM_SLOTS": 4, "S_POW2": 4, "BM": bm, "BR": br, "BK": m.BK, "DOT_PRECISION": precision,
                      "USE_PDL": True}
            build(m._lora_shrink_kernel, sig, consts, f"lora shrink {dtype} BM={bm} BR={br}")
            sig = {"h_ptr": "*fp32", "b_ptr": f"*{dtype}", "order_ptr": "*i64", "starts_ptr": "*i64",
                   "y_ptr": f"*{dtype}", "N": "i32", "RT": "i32", "num_splits": "i32", "n_per_program": "i32",
                   "stride_hs": "i32",
                   "stride_hm": "i32", "stride_bn": "i32", "stride_ym": "i32", "NUM_SLOTS": "constexpr",
                   "S_POW2": "constexpr", "BM": "constexpr", "BN": "constexpr", "BR": "constexpr",
                   "SPLIT_UNROLL": "constexpr", "DOT_PRECISION": "constexpr", "USE_PDL": "constexpr"}
            consts = {"NUM_SLOTS": 4, "S_POW2": 4, "BM": bm, "BN": 128 if bm == 16 else 64, "BR": br,
                      "SPLIT_UNROLL": 8 if bm == 16 else 1, "DOT_PRECISION": precision, "USE_PDL": True}
            build(m._lora_expand_kernel, sig, consts, f"lora expand {dtype} BM={bm} BR={br}")


def moe() -> None:
    """The MoE experts' grouped GEMMs (fused_moe.py) at both launch plans, bf16 and fp32; SwiGLU without biases and
    gpt-oss's gate with its biases."""
    from pagedserve.executor.kernels import fused_moe as m

    for dtype in ("bf16", "fp32"):
        precision = "ieee" if dtype == "fp32" else "tf32"
        for entries, gpt_oss in ((8, False), (4096, False), (8, True)):
            bm, bn, bk, warps = m.moe_plan(entries)
            consts = {"NUM_EXPERTS": 128, "E_POW2": 128, "BM": bm, "BN": bn, "BK": bk, "DOT_PRECISION": precision,
                      "HAS_BIAS": gpt_oss, "USE_PDL": True}
            sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "order_ptr": "*i64", "starts_ptr": "*i64",
                   "h_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "K": "i32", "N": "i32", "top_k": "i32",
                   "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_hm": "i32", "alpha": "fp32",
                   "limit": "fp32", **dict.fromkeys(consts, "constexpr"), "ACT": "constexpr"}
            name = f"moe gate_up {dtype} BM={bm} BN={bn}" + (" gpt-oss" if gpt_oss else "")
            build(m._moe_gate_up_kernel, sig, {**consts, "ACT": int(gpt_oss)}, name, num_warps=warps)
            sig = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "order_ptr": "*i64", "starts_ptr": "*i64",
                   "route_ptr": "*fp32", "y_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "K": "i32", "N": "i32",
                   "stride_hm": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_ym": "i32",
                   **dict.fromkeys(consts, "constexpr")}
            name = f"moe down {dtype} BM={bm} BN={bn}" + (" gpt-oss" if gpt_oss else "")
            build(m._moe_down_kernel, sig, consts, name, num_warps=warps)


def w4() -> None:
    """The 4-bit weight GEMM (w4a16.py) at its decode and prefill plans, bf16 and fp16."""
    from pagedserve.executor.kernels import w4a16 as m

    for dtype in ("bf16", "fp16"):
        for rows in (1, 256):
            bm, bn, bk, warps = m.w4a16_plan(rows, 128)
            sig = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "s_ptr": "*fp32", "zs_ptr": "*fp32", "b_ptr": f"*{dtype}",
                   "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "GROUP": "i32", "k_per_split": "i32",
                   "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32", "stride_ym": "i32", "stride_ys": "i32"}
            consts = {"HAS_BIAS": True, "BM": bm, "BN": bn, "BK": bk, "DOT_PRECISION": "tf32", "USE_PDL": True}
            build(m._w4a16_kernel, sig | dict.fromkeys(consts, "constexpr"), consts,
                  f"w4a16 {dtype} BM={bm} BN={bn} BK={bk}", num_warps=warps)


def logprobs() -> None:
    """The fused logprob statistics (logprob_stats.py): the partials over fp32 and bf16 rows, the merge."""
    from pagedserve.executor.kernels import logprob_stats as m

    for dtype in ("fp32", "bf16"):
        sig = {"logits_ptr": f"*{dtype}", "token_ptr": "*i64", "part_m_ptr": "*fp32", "part_s_ptr": "*fp32",
               "part_c_ptr": "*i32", "part_i_ptr": "*i32", "stride_row": "i32", "vocab": "i32",
               "cols_per_split": "i32", "num_splits": "i32", "BLOCK": "constexpr"}
        build(m._logprob_partials_kernel, sig, {"BLOCK": m.BLOCK}, f"logprob partials {dtype}")
    for want_max in (True, False):
        sig = {"logits_ptr": "*fp32", "token_ptr": "*i64", "part_m_ptr": "*fp32", "part_s_ptr": "*fp32",
               "part_c_ptr": "*i32", "part_i_ptr": "*i32", "token_lp_ptr": "*fp32", "rank_ptr": "*i64",
               "max_lp_ptr": "*fp32", "argmax_ptr": "*i64", "stride_row": "i32", "num_splits": "i32",
               "SPLITS_P2": "constexpr", "WANT_MAX": "constexpr"}
        build(m._logprob_merge_kernel, sig, {"SPLITS_P2": 4, "WANT_MAX": want_max}, f"logprob merge max={want_max}",
              num_warps=1)


if __name__ == "__main__":
    print(f"triton {triton.__version__}")
    for name in sys.argv[1:] or ["sample", "filter", "penalties", "tma", "decode", "qkv", "norm", "logprobs",
                                 "kvfp8"]:
        {"sample": sample, "filter": sample_filter, "penalties": penalties, "tma": tma, "decode": decode, "qkv": qkv,
         "norm": norm, "logprobs": logprobs, "kvfp8": kvfp8, "lora": lora, "moe": moe, "w4": w4}[name]()
