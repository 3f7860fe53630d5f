"""AWQ and GPTQ checkpoints (integer weights with group-wise scales and zero points), dequantized at load.

Qwen publishes its instruct models as AWQ and GPTQ-Int4 / Int8 checkpoints, and many community checkpoints are
one or the other. Their projections are stored packed, eight 4-bit (or four 8-bit) values an int32:

    AWQ (AutoAWQ "gemm", 4-bit)   qweight [in, out / 8]       the 8 columns of a word in the order 0 2 4 6 1 3 5 7
                                  qzeros  [in / G, out / 8]   same packing; scales [in / G, out]
                                  w[k, n] = (q[k, n] - z[k / G, n]) * s[k / G, n]
    GPTQ (AutoGPTQ, 4 or 8-bit)   qweight [in / p, out]       packed along the input rows, in order
                                  qzeros  [groups, out / p]   packed along the columns; stored as zero - 1 (the
                                                              "gptq" format; "gptq_v2" stores the zero itself)
                                  scales  [groups, out];  g_idx [in]: each input row's group (act-order:
                                  desc_act), else row / G
                                  w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
    compressed-tensors            weight_packed [out, in / p] packed along the input columns, lowest bits first,
    (llm-compressor's W4A16 /     each value stored + 2^(bits-1); weight_scale [out, groups]; weight_zero_point
    W8A16 "pack-quantized";       [out / p, groups] packed along the rows (asymmetric schemes; symmetric ones
    "int-quantized": int8         have none: zero 2^(bits-1) in stored terms); weight_g_idx [in] with act-order;
    `weight` unpacked)            weight_shape [2]. w[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]

The loader streams a checkpoint's tensors through `dequantize_stream`, which holds a projection's parts until all
have come and then yields its `weight` [out, in] in fp32: the model stores it in its own dtype, so the projections
run as 16-bit ones (no memory saving; `--quantization fp8` re-quantizes them to fp8 rows, half the 16-bit bytes).
Tensors of modules the checkpoint left unquantized (e.g. lm_head) pass through as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble i holds column 8c + AWQ_ORDER[i]
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


# Checkpoint methods whose projections are integers (checkpoint_quantization's names for them).
INT_METHODS = ("awq", "gptq", "compressed-tensors")
_CT_PARTS = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_g_idx", ".weight_shape")


@dataclass(frozen=True, slots=True)
class IntQuantConfig:
    method: str  # "awq" | "gptq" | "compressed-tensors"
    bits: int
    group_size: int  # -1: one group for the whole input
    zero_offset: int  # GPTQ's "gptq" format stores zero - 1: added back (0 for AWQ and "gptq_v2")
    # compressed-tensors: zero points in the file (asymmetric), g_idx in the file (act-order), the storage format
    symmetric: bool = True
    act_order: bool = False
    format: str = ""

    @property
    def pack(self) -> int:
        return 32 // self.bits


def int_quant_config(qc: dict[str, Any]) -> IntQuantConfig:
    """The AWQ / GPTQ settings of a quantization_config; ValueError for variants not supported."""
    method = qc.get("quant_method")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ValueError(f"AWQ checkpoints of version {version!r} with {bits} bits are not supported; 4-bit "
                             "'gemm' ones are")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported")
        return IntQuantConfig("awq", 4, group, 0)
    if method == "gptq":
        if bits not in (4, 8):
            raise ValueError(f"GPTQ checkpoints of {bits} bits are not supported; 4 and 8-bit ones are")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return IntQuantConfig("gptq", bits, group, 1 if fmt == "gptq" else 0)
    if method == "compressed-tensors":
        return _compressed_int_config(qc)
    raise ValueError(f"not an AWQ / GPTQ config: {method!r}")


def is_compressed_int(qc: dict[str, Any]) -> bool:
    """A compressed-tensors config whose weights are integers (else fp8: executor/quantization.py)."""
    groups = qc.get("config_groups") or {}
    return any(((g or {}).get("weights") or {}).get("type") == "int" for g in groups.values())


def _compressed_int_config(qc: dict[str, Any]) -> IntQuantConfig:
    """llm-compressor's integer schemes (W4A16 / W8A16, symmetric or not, per group or per channel, act-order):
    one weights scheme for every group; activations stay 16-bit (a W8A8 scheme's input quantization is not run)."""
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("a compressed-tensors checkpoint without config_groups is not supported")
    schemes = []
    for name, group in groups.items():
        weights = (group or {}).get("weights") or {}
        fmt = (group or {}).get("format") or qc.get("format") or "pack-quantized"
        bits, strategy = weights.get("num_bits"), weights.get("strategy")
        if (weights.get("type") != "int" or bits not in (4, 8) or strategy not in ("group", "channel")
                or fmt not in ("pack-quantized", "int-quantized", "naive-quantized")
                or (fmt != "pack-quantized" and bits != 8) or weights.get("block_structure")):
            raise ValueError(f"compressed-tensors scheme {name!r} ({fmt}, weights {weights}) is not supported; "
                             "integer weights of 4 or 8 bits per group or channel (pack-quantized, or int-quantized "
                             "8-bit) and fp8 weights are")
        # ("group" act-order saves each input's group; "weight" only changed the order GPTQ quantized in)
        act_order = weights.get("actorder") in ("group", "dynamic", True)
        group_size = int(weights.get("group_size") or -1) if strategy == "group" else -1
        schemes.append((bits, group_size, bool(weights.get("symmetric", True)), act_order, fmt))
    if len(set(schemes)) > 1:
        raise ValueError(f"compressed-tensors checkpoints with several weight schemes ({sorted(set(schemes))}) are "
                         "not supported")
    bits, group_size, symmetric, act_order, fmt = schemes[0]
    return IntQuantConfig("compressed-tensors", bits, group_size, 0, symmetric, act_order, fmt)


def _unpack_compressed(config: IntQuantConfig, prefix: str, parts: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors parts -> unpack_parts' (q [in, out], zeros [groups, out], scales [groups, out] fp32,
    groups [in]), in stored (unsigned) terms."""
    offset = 1 << (config.bits - 1)
    scales = parts[".weight_scale"].float()  # [out, groups]
    if ".weight_packed" in parts:
        out_f, in_f = (int(v) for v in parts[".weight_shape"].reshape(-1).tolist())
        q = _unpack(parts[".weight_packed"], config.bits, 1)[:, :in_f]  # [out, in]
    else:  # int-quantized: signed int8 values as they are
        q = parts[".weight"].to(torch.int32) + offset
        out_f, in_f = q.shape
    if q.shape != (out_f, in_f) or scales.shape[0] != out_f:
        raise ValueError(f"compressed-tensors checkpoint: {prefix} parts do not fit: values {tuple(q.shape)}, "
                         f"scales {tuple(scales.shape)}")
    num_groups = scales.shape[1]
    if ".weight_zero_point" in parts:
        zp = parts[".weight_zero_point"]
        zeros = (_unpack(zp, config.bits, 0)[:out_f] if config.format == "pack-quantized" and zp.dtype == torch.int32
                 else zp.to(torch.int32).reshape(out_f, num_groups) + offset)
    else:
        zeros = torch.full((out_f, num_groups), offset, dtype=torch.int32, device=q.device)
    if ".weight_g_idx" in parts:
        groups = parts[".weight_g_idx"].long()
    else:
        groups = torch.arange(in_f, device=q.device) // -(-in_f // num_groups)
    if zeros.shape != scales.shape or groups.shape != (in_f,) or int(groups.max()) >= num_groups:
        raise ValueError(f"compressed-tensors checkpoint: {prefix} parts do not fit: zeros {tuple(zeros.shape)}, "
                         f"scales {tuple(scales.shape)}, {in_f} inputs")
    return q.t(), zeros.t(), scales.t(), groups


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 / bits values (int32, unsigned), unpacked along `dim` (each word's values in shift
    order, lowest bits first)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 1:
        values = (packed.to(torch.int32)[:, :, None] >> shifts) & mask  # [rows, words, per]
        return values.reshape(packed.shape[0], -1)
    values = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & mask  # [words, per, cols]
    return values.reshape(-1, packed.shape[1])


def unpack_parts(config: IntQuantConfig, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A projection's (q [in, out], zeros [groups, out], scales [groups, out] fp32, each input row's group [in]), the
    values unpacked in their natural order; W[n, k] = (q[k, n] - zeros[g[k], n]) scales[g[k], n]."""
    scales = scales.float()
    if config.method == "awq":
        reorder = torch.tensor([AWQ_ORDER.index(i) for i in range(8)], device=qweight.device)
        q = _unpack(qweight, 4, 1)
        q = q.view(q.shape[0], -1, 8)[:, :, reorder].reshape(q.shape[0], -1)  # [in, out], natural column order
        z = _unpack(qzeros, 4, 1)
        z = z.view(z.shape[0], -1, 8)[:, :, reorder].reshape(z.shape[0], -1)  # [groups, out]
        in_features = q.shape[0]
        groups = torch.arange(in_features, device=q.device) // (config.group_size if config.group_size > 0
                                                                 else in_features)
    else:
        q = _unpack(qweight, config.bits, 0)  # [in, out]
        z = _unpack(qzeros, config.bits, 1) + config.zero_offset  # [groups, out]
        in_features = q.shape[0]
        if g_idx is not None:
            groups = g_idx.long()
        else:
            groups = torch.arange(in_features, device=q.device) // (config.group_size if config.group_size > 0
                                                                     else in_features)
    if q.shape[1] != scales.shape[1] or z.shape != scales.shape or int(groups.max()) >= scales.shape[0]:
        raise ValueError(f"{config.method} parts do not fit: qweight unpacks to {tuple(q.shape)}, zeros to "
                         f"{tuple(z.shape)}, scales {tuple(scales.shape)}")
    return q, z, scales, groups


def dequantize(config: IntQuantConfig, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """A projection's weight [out, in] in fp32 from its packed parts (see the module docstring)."""
    return _dequantized(*unpack_parts(config, qweight, qzeros, scales, g_idx))


def _dequantized(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """W [out, in] from unpack_parts' values: (q - zero) * scale, each input row with its group's."""
    return ((q - z[groups]).float() * scales[groups]).t().contiguous()


def _values(config: IntQuantConfig, prefix: str, parts: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if config.method == "compressed-tensors":
        return _unpack_compressed(config, prefix, parts)
    return unpack_parts(config, parts[".qweight"], parts[".qzeros"], parts[".scales"], parts.get(".g_idx"))


def _as_int4(config: IntQuantConfig, prefix: str, parts: dict[str, torch.Tensor]
             ) -> list[tuple[str, torch.Tensor]]:
    """A projection as the 4-bit kernel holds it (kernels/w4a16.py: scales, zs, then the packed rows, the order
    Linear.use_int4_storage takes them in), or its dequantized weight where that layout cannot hold it: act-order
    groups (g_idx not row / G), groups not a multiple of 16 inputs, or an MoE expert (the experts are stacked)."""
    q, z, scales, groups = _values(config, prefix, parts)
    in_features, num_groups = q.shape[0], scales.shape[0]
    size = in_features // num_groups
    regular = (in_features % num_groups == 0 and size % 16 == 0 and ".experts." not in prefix
               and torch.equal(groups, torch.arange(in_features, device=groups.device) // size))
    if not regular:
        return [(prefix + ".weight", _dequantized(q, z, scales, groups))]
    from pagedserve.executor.kernels.w4a16 import pack_int4_rows

    packed, row_scales, zs = pack_int4_rows(q, z, scales)
    return [(prefix + ".w4_scales", row_scales), (prefix + ".w4_zs", zs), (prefix + ".w4_qweight", packed)]


def dequantize_stream(config: IntQuantConfig, weights: Iterable[tuple[str, torch.Tensor]], keep_int4: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each quantized projection's parts replaced by its dequantized `weight` (yielded
    once all its parts have come: qweight, qzeros, scales, and GPTQ's g_idx when the file has one). keep_int4 (4-bit
    checkpoints): the projections the 4-bit kernel can run come as its packed rows instead (_as_int4)."""

    def converted(prefix: str, parts: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        if keep_int4:
            return _as_int4(config, prefix, parts)
        return [(prefix + ".weight", _dequantized(*_values(config, prefix, parts)))]

    if config.method == "compressed-tensors":
        yield from _compressed_stream(config, weights, converted)
        return
    pending: dict[str, dict[str, torch.Tensor]] = {}
    needed = 4 if config.method == "gptq" else 3  # (GPTQ writers save g_idx with every projection)
    for name, tensor in weights:
        part = next((p for p in _PARTS if name.endswith(p)), None)
        if part is None or (part == ".g_idx" and config.method != "gptq"):
            yield name, tensor
            continue
        prefix = name[: -len(part)]
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == needed:
            del pending[prefix]
            yield from converted(prefix, parts)
    for prefix, parts in pending.items():
        if all(p in parts for p in _PARTS[:3]):  # a GPTQ projection saved without g_idx
            yield from converted(prefix, parts)
        else:
            missing = [p[1:] for p in _PARTS[:3] if p not in parts]
            raise ValueError(f"{config.method} checkpoint: {prefix} lacks {', '.join(missing)}")


def _compressed_stream(config: IntQuantConfig, weights: Iterable[tuple[str, torch.Tensor]], converted
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """dequantize_stream for compressed-tensors: a projection's parts are held until all have come (packed values,
    scale and shape; zero point when asymmetric; g_idx with act-order); an int8 `weight` is an int-quantized one."""
    needed = {".weight_scale"} | ({".weight_packed", ".weight_shape"} if config.format == "pack-quantized"
                                  else {".weight"})
    needed |= set() if config.symmetric else {".weight_zero_point"}
    needed |= {".weight_g_idx"} if config.act_order else set()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        part = next((p for p in _CT_PARTS if name.endswith(p)), None)
        if part is None and name.endswith(".weight") and tensor.dtype == torch.int8:
            part = ".weight"
        if part is None:
            yield name, tensor
            continue
        prefix = name[: -len(part)]
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if needed <= parts.keys():
            del pending[prefix]
            yield from converted(prefix, parts)
    for prefix, parts in pending.items():
        missing = sorted(p[1:] for p in needed - parts.keys())
        raise ValueError(f"compressed-tensors checkpoint: {prefix} lacks {', '.join(missing)}")


__all__ = ["AWQ_ORDER", "IntQuantConfig", "dequantize", "dequantize_stream", "int_quant_config", "unpack_parts"]
