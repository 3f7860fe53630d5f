"""The model runner: SchedulerOutput -> flat step tensors -> model -> sampler -> RunnerOutput.

It owns the KV cache (one [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer) and the
attention backend, and never touches request state: everything it needs arrives in the
SchedulerOutput, and it hands back one sampled token per request that asked for one (and, for a request
with draft tokens, one more at each draft's position: speculative decoding, spec_decode.py).

Step inputs are built with numpy and cross to the device in ONE copy: all integer arrays are packed
into one int64 host buffer (pinned on CUDA), copied, then sliced into views on the device:

    | input_ids T | positions T | slot_mapping T | query_start_loc S+1 | seq_lens S |
    | block_tables S*W | logits_indices L | placeholder_dst P | placeholder_src P | seq_order O |
    | decode_work 6*I |

(seq_order: O = S on decode-only steps when the backend wants it, else 0. decode_work replaces it
when the decode batch fills the SMs (paged_attention_decode.decode_work_list: I chunks, 6 rows).)

Async steps: `execute_async` queues a step on the device and returns a handle at once; the host
reads the sampled ids only in `StepHandle.result()`. Meanwhile the engine may schedule and queue
the next step, whose decodes carry PLACEHOLDER_TOKEN_ID for the tokens still being sampled: the
runner replaces them on the device, input_ids[dst] = previous_step_sampled[src], so a step never
waits for the one before it. The host buffers alternate between two pinned copies, so building
step N+1's inputs never overwrites what step N's copy may still be reading.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import (
    PLACEHOLDER_TOKEN_ID,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from pagedserve.distributed import broadcast_tensor, tp_size
from pagedserve.executor.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from pagedserve.executor.attention.torch_ref import TorchAttentionBackend
from pagedserve.executor.models.decoder import head_dim_of, local_num_kv_heads
from pagedserve.executor.sampler import SampleResult, StepHistory, finite_or, logprob_stats
from pagedserve.pooling_params import PoolingParams

logger = logging.getLogger(__name__)

class SamplerLike(Protocol):
    """What the runner needs of a sampler (executor/sampler.py's Sampler; tests use stand-ins)."""

    def sample(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest],
               history: StepHistory | None = None) -> SampleResult: ...


class StepHandle:
    """A queued step. result() waits for its sampled tokens and returns the RunnerOutput."""

    def __init__(self, scheduled: list[ScheduledRequest], host_payload: torch.Tensor | None,
                 ready: torch.cuda.Event | None, decode: Callable | None,
                 started: torch.cuda.Event | None = None, prompt_part: tuple | None = None,
                 pool_part: tuple | None = None) -> None:
        self._scheduled = scheduled
        self._prompt_part = prompt_part  # prompt logprobs: (host payload, its ready event or None, decode)
        self._pool_part = pool_part  # embedding rows: (host [P, H] fp32, its ready event or None, scheduled indices)
        self._host_payload = host_payload  # on the host (pinned when it came from a GPU)
        self._ready = ready  # recorded after the device-to-host copy; None: already on the host
        self._decode = decode
        self._started = started  # timing event recorded once the step's inputs were queued
        self._output: RunnerOutput | None = None

    @property
    def device_seconds(self) -> float | None:
        """After result(): the device's time on this step, from its first kernel (once the step
        before it finished) to the samples on the host; None where not measured."""
        if self._started is None or self._ready is None or self._output is None:
            return None
        return self._started.elapsed_time(self._ready) / 1e3

    def result(self) -> RunnerOutput:
        if self._output is None:
            num = len(self._scheduled)
            output = RunnerOutput([None] * num, [None] * num)
            if self._host_payload is not None:
                if self._ready is not None:
                    self._ready.synchronize()
                token_ids, logprobs = self._decode(self._host_payload.tolist())
                sampled = iter(zip(token_ids, logprobs))
                for i, request in enumerate(self._scheduled):
                    if request.needs_sample:
                        output.sampled_token_ids[i], output.logprobs[i] = next(sampled)
                        if request.draft_token_ids:  # speculative decoding: the samples at the drafts' positions
                            if output.draft_samples is None:
                                output.draft_samples = [None] * num
                            output.draft_samples[i] = [next(sampled) for _ in request.draft_token_ids]
            if self._prompt_part is not None:
                host, ready, decode = self._prompt_part
                if ready is not None:
                    ready.synchronize()
                output.prompt_logprobs = decode(host.tolist())
            if self._pool_part is not None:
                host, ready, rows = self._pool_part
                if ready is not None:
                    ready.synchronize()
                output.embeddings = [None] * num
                for vector, i in zip(host, rows):
                    output.embeddings[i] = pooled(vector, self._scheduled[i].sampling_params.pooling)
            self._output = output
        return self._output


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64 (T may include padding tokens: see padded_count)
    positions: torch.Tensor  # [T] int64
    ctx: ForwardContext
    logits_indices: torch.Tensor  # [L'] int64: the last token of each request that samples (+ padding)
    num_logits: int  # L <= L': the first L logits rows are real
    # A decode step for the CUDA graphs: ctx's metadata holds the int64 views of the packed buffer (the
    # graph's input copies convert them), and with every token a placeholder, placeholder_rows holds
    # each row's index into the last step's samples (input_ids still holds the placeholder ids).
    graph_step: bool = False
    placeholder_rows: torch.Tensor | None = None
    # A mixed step for the mixed-step CUDA graphs (mixed_graph.py): unpadded, int64 metadata views.
    mixed_graph_step: bool = False
    # Prompt logprobs to compute this step (prompt_logprob_plan): such steps run eager, for the hidden states.
    prompt_plan: list[tuple[int, int, int, int]] | None = None
    # Embedding requests at their last prompt token: (indices among the logits rows, indices among the scheduled
    # requests). Such steps run eager too: the pooled vector is that row's final hidden state.
    pool_rows: tuple[list[int], list[int]] | None = None
    lora_any: bool = False  # LoRA enabled and some token of the step has an adapter (executor/lora.py)


def prefill_warm_probes(head_dim: int, queries_per_kv: int) -> list[tuple[int, int]]:
    """(max_seq_len, max_query_len) pairs, one for each tile configuration default_prefill_config can choose for
    this model's attention (short or long keys x the row tiles; tests/executor check the coverage)."""
    from pagedserve.executor.kernels.paged_attention_prefill import default_prefill_config

    probes, seen = [], set()
    for keys in (16, 1 << 20):  # short keys, long keys
        for max_query_len in range(1, 257):  # the row tile stops growing before 256 tokens
            config = tuple(sorted(default_prefill_config(head_dim, max_query_len, queries_per_kv, keys).items()))
            if config not in seen:
                seen.add(config)
                probes.append((keys, max_query_len))
    return probes


def prompt_logprob_plan(scheduled: Sequence[ScheduledRequest], query_start_loc: np.ndarray
                        ) -> list[tuple[int, int, int, int]]:
    """The rows whose logits give prompt logprobs this step: (index in scheduled, first row among the step's
    tokens, prompt index of the first token they predict, count). The token at position p predicts prompt
    token p + 1; a request asks while it has no output yet (after a preemption its recompute asks nothing)."""
    plan = []
    for i, r in enumerate(scheduled):
        if not r.wants_prompt_logprobs:
            continue
        start = r.num_computed_tokens
        count = min(len(r.token_ids), len(r.prompt_token_ids) - 1 - start)
        if count > 0:
            plan.append((i, int(query_start_loc[i]), start + 1, count))
    return plan


def sampling_rows(scheduled: Sequence[ScheduledRequest]) -> list[ScheduledRequest]:
    """The sampler's rows: one per sampling request, and with draft tokens one more per draft, each a copy at its
    own output index (so its seed and min_tokens are those of its position; spec_decode.py)."""
    rows: list[ScheduledRequest] = []
    for r in scheduled:
        if r.needs_sample:
            rows.append(r)
            rows.extend(dataclasses.replace(r, output_index=r.output_index + j, draft_token_ids=[])
                        for j in range(1, len(r.draft_token_ids) + 1))
    return rows


def last_sample_rows(rows: Sequence[ScheduledRequest]) -> dict[str, int]:
    """Each request's row among the step's samples: its first. (A drafted request's next token is known only once
    its drafts are checked on the host, so it sits out the step scheduled meanwhile: no placeholder points here.)"""
    out: dict[str, int] = {}
    for i, r in enumerate(rows):
        out.setdefault(r.request_id, i)
    return out


def rows_per_sequence(config: EngineConfig) -> int:
    """Logits rows a running sequence may take in one step: 1, or 1 + num_speculative_tokens with speculative
    decoding (a decode and its drafts)."""
    spec = config.speculative_config
    return 1 + (spec["num_speculative_tokens"] if spec else 0)


def padded_count(n: int) -> int:
    """The token (or logits-row) count an eager step runs at: a multiple of 16 up to 256, of 64 up to
    8192, then of 256. cuBLAS picks an algorithm the first time it meets a GEMM shape, ~300 us of host
    time per GEMM on the H100 machine against ~25 us for a shape seen before (scripts/launch_probe.py);
    mixed steps, whose token counts rarely repeat, spent ~45 ms each launching. Padded tokens have slot
    -1 (nothing cached) and belong to no sequence (attention leaves their rows alone); padded logits rows
    repeat a real one and are dropped before sampling. At most 255 extra tokens, in steps whose GEMMs
    stream weights (small counts) or are large (>= 8192 tokens: < 3%)."""
    if n <= 0:
        return n
    step = 16 if n <= 256 else 64 if n <= 8192 else 256
    return -(-n // step) * step


def pooled(hidden: torch.Tensor, params: PoolingParams) -> list[float]:
    """An embedding request's vector from its last prompt token's final hidden state (fp32, on the host): the
    first `dimensions` values, divided by their L2 norm when `normalize` (as F.normalize: eps 1e-12). A
    classification request's `hidden` is its score head's logits: their softmax (a sigmoid for one label)."""
    if params.task == "classify":
        return (hidden.sigmoid() if hidden.numel() == 1 else hidden.softmax(-1)).tolist()
    if params.dimensions is not None:
        hidden = hidden[: params.dimensions]
    if params.normalize:
        hidden = hidden / hidden.norm().clamp_min(1e-12)
    return hidden.tolist()


def kv_cache_dtype_of(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype, or float8_e4m3fn for kv_cache_dtype fp8 / fp8_e4m3 (values
    clamped to +-448 and rounded when written, widened for the attention dots when read: kernels/kv_store.py)."""
    return torch.float8_e4m3fn if config.kv_cache_dtype.startswith("fp8") else dtype


def kv_cache_bytes_per_block(hf_config: Any, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block across all layers (this rank's kv heads)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * local_num_kv_heads(hf_config) * head_dim_of(hf_config) * element_size
    return hf_config.num_hidden_layers * block_size * per_token


@dataclass(frozen=True)
class KVLayout:
    """Which KV tensor and block table each layer uses. One table and a tensor a layer, except for a hybrid model
    (windowed and full-attention layers; core/kv_cache.py): its layers in groups of `group_size`, group 0 the
    full-attention layers, groups 1..num_window_groups the windowed ones (reading the window tables), and
    `group_size` tensors of `num_blocks` blocks, the layer at slot j of every group using tensor j (a block id belongs
    to one group at a time)."""

    num_blocks: int
    window: int | None
    num_window_groups: int
    group_of_layer: tuple[int, ...]  # 0: the full-attention group (or every layer); k: window group k
    slot_of_layer: tuple[int, ...]  # the KV tensor of each layer
    group_size: int

    @staticmethod
    def uniform(num_blocks: int, num_layers: int) -> KVLayout:
        return KVLayout(num_blocks, None, 0, (0,) * num_layers, tuple(range(num_layers)), num_layers)


def allocate_kv_caches(
    hf_config: Any, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
    layout: KVLayout | None = None,
) -> list[torch.Tensor]:
    """One cache a layer ([2, num_blocks, block_size, kv heads, head dim]); with a hybrid model's layout, the layers
    at one slot of their groups share one."""
    shape = (2, num_blocks, block_size, local_num_kv_heads(hf_config), head_dim_of(hf_config))
    if layout is None:
        layout = KVLayout.uniform(num_blocks, hf_config.num_hidden_layers)
    # Zeros, not empty: a bug that reads an unwritten slot then shows up as a wrong value, not NaN.
    tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.group_size)]
    return [tensors[slot] for slot in layout.slot_of_layer]


def select_attention_backend(config: EngineConfig, device: torch.device) -> AttentionBackend:
    name = config.attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        try:
            from pagedserve.executor.attention.triton_backend import TritonAttentionBackend
        except ImportError as e:
            logger.warning("Triton attention backend unavailable (%s); using the torch reference backend", e)
        else:
            return TritonAttentionBackend()
    return TorchAttentionBackend()


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        hf_config: Any,
        device: torch.device | str,
        dtype: torch.dtype,
        num_kv_blocks: int,
        block_size: int,
        sampler: SamplerLike,
        layout: KVLayout | None = None,
    ) -> None:
        """layout: which KV tensor and block table each layer uses (a hybrid model's groups; KVLayout); None: one
        table, a tensor a layer."""
        self.config = config
        self.model = model
        self.hf_config = hf_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.sampler = sampler
        self.backend = select_attention_backend(config, self.device)
        self.kv_dtype = kv_cache_dtype_of(config, dtype)
        self.layout = layout or KVLayout.uniform(num_kv_blocks, hf_config.num_hidden_layers)
        self.num_window_groups = self.layout.num_window_groups
        self.kv_caches = allocate_kv_caches(hf_config, num_kv_blocks, block_size, self.device, self.kv_dtype,
                                            self.layout)
        if self.num_window_groups:  # each windowed layer reads its group's tables (AttentionMetadata.windows)
            for layer, group in zip(model.model.layers, self.layout.group_of_layer, strict=True):
                layer.self_attn.kv_group = group
        # The cache's own kv-head count (the decode kernel's, and the CUDA graphs' when they pick a mode).
        self._num_kv_heads = self.kv_caches[0].shape[3]
        if getattr(self.backend, "decode_work", False):  # the decode work list's chunks follow its tile
            from pagedserve.executor.kernels.paged_attention_decode import default_decode_config

            self._decode_block_n = default_decode_config(head_dim_of(hf_config), dtype)["block_n"]
        # Two host buffers used in turn (see the module docstring), each with the event of the last
        # host-to-device copy that read it.
        self._host_buffers = [np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)]
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copy_done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.lora_manager = None  # enable_lora: the adapter slots (executor/lora.py), set by the worker
        # KV offloading: the CPU tier's K/V, one [2, cpu blocks, block_size, kv heads, head_dim] tensor a layer (pinned
        # on CUDA); set by the worker (allocate_cpu_kv_tier), else None
        self.cpu_kv_caches: list[torch.Tensor] | None = None
        # The last step's sampled token ids (device) and each sampled request's row in them.
        self._last_sampled: torch.Tensor | None = None
        self._last_sample_rows: dict[str, int] = {}
        self._finished_ids: list[str] = []  # requests ended since the sampler last heard (its history can go)
        self.cuda_graphs = None  # CUDAGraphDecoder once capture_cuda_graphs() ran
        self.mixed_graphs = None  # CUDAGraphMixed likewise (mixed steps of up to ~1k tokens)
        # Eager steps (prefills, mixed) run at padded token counts (padded_count) on CUDA; decode-only
        # steps are left exact (CUDA graphs pad them their own way).
        self.pad_eager_steps = torch.device(device).type == "cuda"
        logger.info("model runner: %d KV blocks of %d tokens, %s attention, %s", num_kv_blocks,
                    block_size, self.backend.name, dtype)

    # --- inputs ---------------------------------------------------------------------------------

    def prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        scheduled = scheduler_output.scheduled
        num_seqs = len(scheduled)
        query_lens = np.fromiter((len(r.token_ids) for r in scheduled), dtype=np.int64, count=num_seqs)
        num_computed = np.fromiter((r.num_computed_tokens for r in scheduled), dtype=np.int64, count=num_seqs)
        seq_lens = num_computed + query_lens
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        # Block table width: the blocks the longest sequence of this step needs (not the max model len).
        width = max(1, int(((seq_lens + self.block_size - 1) // self.block_size).max()))
        sample_rows = [i for i, r in enumerate(scheduled) if r.needs_sample]
        # Logits rows: each sampling request's last token, or with draft tokens its last 1 + drafts tokens.
        row_counts = np.fromiter((1 + len(scheduled[i].draft_token_ids) for i in sample_rows), dtype=np.int64,
                                 count=len(sample_rows))
        num_logits = int(row_counts.sum())
        drafting = num_logits > len(sample_rows)
        # Attention's sequences: the requests, but a request with drafts is one sequence a token (token j of it sees
        # the keys up to its own position: seq_len num_computed + j + 1), so its tokens run in the decode kernel
        # (split over the context, as every decode) and a step of decodes and drafts is decode-only (the graphs).
        if drafting:
            drafted = np.fromiter((bool(r.draft_token_ids) for r in scheduled), dtype=bool, count=num_seqs)
            reps = np.where(drafted, query_lens, 1)
            attn_of = np.repeat(np.arange(num_seqs), reps)  # each attention sequence's request
            into = np.arange(len(attn_of)) - np.repeat(np.cumsum(reps) - reps, reps)
            attn_query_lens = np.where(drafted[attn_of], 1, query_lens[attn_of])
            attn_seq_lens = np.where(drafted[attn_of], num_computed[attn_of] + into + 1, seq_lens[attn_of])
            attn_qsl = np.zeros(len(attn_of) + 1, dtype=np.int64)
            np.cumsum(attn_query_lens, out=attn_qsl[1:])
        else:
            attn_of, attn_query_lens, attn_seq_lens, attn_qsl = None, query_lens, seq_lens, query_start_loc
        num_attn = len(attn_seq_lens)
        token_ids = np.fromiter((t for r in scheduled for t in r.token_ids), dtype=np.int64, count=num_tokens)
        placeholder_dst = np.flatnonzero(token_ids == PLACEHOLDER_TOKEN_ID)
        placeholder_src = self._placeholder_sources(scheduled, query_start_loc, placeholder_dst)
        num_placeholders = len(placeholder_dst)
        is_decode_only = num_seqs > 0 and num_tokens == num_attn
        # (A decode step where every row samples holds no prompt row: each token is at or past its prompt's last.)
        prompt_plan = (None if is_decode_only and num_logits == num_attn
                       else prompt_logprob_plan(scheduled, query_start_loc) or None)
        # (An embedding request never drafts; with others drafting its logits row is not its place in sample_rows.)
        first_row = np.cumsum(row_counts) - row_counts
        pool = [(int(first_row[j]), i) for j, i in enumerate(sample_rows)
                if scheduled[i].sampling_params.pooling is not None]
        pool_rows = ([j for j, _ in pool], [i for _, i in pool]) if pool else None
        eager = prompt_plan is not None or pool_rows is not None  # steps that need the hidden states
        graphs = self.cuda_graphs
        # (A one-token chunk may be a prefill piece that does not sample: graphs need every row sampled.)
        graph_step = (graphs is not None and is_decode_only and num_logits == num_attn and not eager
                      and graphs.fits(num_attn, width))
        mixed = self.mixed_graphs
        # (A decode-only step with drafts that no decode graph holds, i.e. more tokens than max_num_seqs, runs the
        # mixed graphs, whose decode kernel takes every sequence then.)
        mixed_graph_step = (mixed is not None and (not is_decode_only or (drafting and not graph_step)) and not eager
                            and mixed.fits(num_tokens, num_attn, width))
        num_order = num_attn if is_decode_only and getattr(self.backend, "wants_seq_order", False) else 0
        work = None
        if num_order and getattr(self.backend, "decode_work", False):
            from pagedserve.executor.kernels import paged_attention_decode as pad

            sms = pad.num_sms(self.device)
            # A graph step's mode is its graph's (capacity 0: seq_order), and its list comes padded to
            # the graph's grid (one copy into it, no fill); an eager step decides by its own size.
            if graph_step:
                capacity = graphs.work_items(graphs.padded_size(num_attn))
                use_work = capacity > 0
            else:
                capacity, use_work = None, pad.uses_work_list(num_attn, self._num_kv_heads, sms)
            if use_work:
                work = pad.decode_work_list(attn_seq_lens, self._num_kv_heads, sms, self._decode_block_n,
                                            capacity=capacity)
                num_order = 0
        num_work = 0 if work is None else work.size
        padded_tokens, padded_logits = num_tokens, num_logits
        if self.pad_eager_steps and not is_decode_only and not mixed_graph_step:  # (the graphs pad their own way)
            padded_tokens, padded_logits = padded_count(num_tokens), padded_count(num_logits)

        num_lora = self.lora_manager.step_size(num_tokens) if self.lora_manager is not None else 0
        # A hybrid model's window groups: their tables and slots, two parts more, a group's rows each even (aligned)
        groups = self.num_window_groups
        table_row, slots_row = num_attn * width + (num_attn * width & 1), padded_tokens + (padded_tokens & 1)
        sizes = [padded_tokens, padded_tokens, padded_tokens, num_attn + 1, num_attn, num_attn * width,
                 padded_logits, num_placeholders, num_placeholders, num_order, num_work, num_lora,
                 groups * table_row, groups * slots_row]
        # Each part starts 16-byte aligned (an even int64 offset): Triton specializes kernels on the
        # alignment of pointer arguments, and a parity that changed with the step would compile
        # new kernel variants in the middle of serving.
        offsets = np.concatenate([[0], np.cumsum([n + (n & 1) for n in sizes])])
        buf = self._host_view(int(offsets[-1]))
        (input_ids, positions, slot_mapping, qsl, sl, block_tables, logits_indices, dst, src, order, work_part,
         lora_part, window_tables_part, window_slots) = (buf[offsets[i] : offsets[i] + sizes[i]]
                                                         for i in range(len(sizes)))
        lora_any = False
        if num_lora:
            token_slots = np.repeat(np.fromiter((r.lora_slot for r in scheduled), dtype=np.int64, count=num_seqs),
                                    query_lens)
            self.lora_manager.step_layout(token_slots, lora_part)
            lora_any = bool(token_slots.any())
        if num_work:
            work_part[:] = work.reshape(-1)
        if num_order:  # only with the Triton backend, so its kernel module (and triton) is there
            from pagedserve.executor.kernels.paged_attention_decode import longest_first_order

            order[:] = longest_first_order(attn_seq_lens)

        if padded_tokens > num_tokens:  # padding: token 0 at position 0, nothing cached (slot -1)
            input_ids[num_tokens:] = 0
            positions[num_tokens:] = 0
            slot_mapping[num_tokens:] = -1
            input_ids, positions, slot_mapping = (a[:num_tokens] for a in (input_ids, positions, slot_mapping))
        if padded_logits > num_logits:  # repeats of the last real row, dropped before sampling
            logits_indices[num_logits:] = query_start_loc[1:][sample_rows[-1]] - 1 if sample_rows else 0
            logits_indices = logits_indices[:num_logits]
        input_ids[:] = token_ids
        dst[:] = placeholder_dst
        src[:] = placeholder_src
        # Token j of request s is at position num_computed[s] + (j - query_start_loc[s]).
        request_of_token = np.repeat(np.arange(num_seqs), query_lens)
        positions[:] = np.arange(num_tokens) + np.repeat(num_computed - query_start_loc[:-1], query_lens)
        qsl[:] = attn_qsl
        sl[:] = attn_seq_lens
        # The requests' block tables (attention's own when no request drafts: each request one sequence).
        tables = block_tables.reshape(num_seqs, width) if attn_of is None else np.empty((num_seqs, width), np.int64)
        tables[:] = 0  # padding: never read, sequences stop at seq_len
        for s, request in enumerate(scheduled):
            needed = (int(seq_lens[s]) + self.block_size - 1) // self.block_size
            if len(request.block_ids) < needed:
                raise ValueError(f"request {request.request_id}: {len(request.block_ids)} blocks cannot "
                                 f"hold {int(seq_lens[s])} tokens of block size {self.block_size}")
            tables[s, :needed] = request.block_ids[:needed]
        if attn_of is not None:
            block_tables.reshape(num_attn, width)[:] = tables[attn_of]
        block_of_token = tables[request_of_token, positions // self.block_size]
        slot_mapping[:] = block_of_token * self.block_size + positions % self.block_size
        if groups:  # the window groups' tables: entry i holds the same positions as the full one's
            rows = window_tables_part.reshape(groups, table_row)[:, :num_attn * width]
            wtables = (rows.reshape(groups, num_seqs, width) if attn_of is None
                       else np.empty((groups, num_seqs, width), np.int64))
            wtables[:] = 0
            window = self.layout.window
            for s, request in enumerate(scheduled):
                needed = (int(seq_lens[s]) + self.block_size - 1) // self.block_size
                # (entries behind the window of the step's first token are never read: left 0, not copied)
                first = max(0, int(num_computed[s]) - window + 1) // self.block_size
                tables_of, offset = request.window_block_ids, request.window_first  # (ids[0] is index `offset`)
                if (tables_of is None or len(tables_of) != groups or offset > first
                        or any(len(ids) + offset < needed for ids in tables_of)):
                    raise ValueError(f"request {request.request_id}: the window groups' block tables cannot hold "
                                     f"{int(seq_lens[s])} tokens in {groups} group(s)")
                for k, ids in enumerate(tables_of):
                    wtables[k, s, first:needed] = ids[first - offset:needed - offset]
            if attn_of is not None:
                rows.reshape(groups, num_attn, width)[:] = wtables[:, attn_of]
            slots = window_slots.reshape(groups, slots_row)
            slots[:, num_tokens:] = -1
            slots[:, :num_tokens] = (wtables[:, request_of_token, positions // self.block_size] * self.block_size
                                     + positions % self.block_size)
        if drafting:
            ends = np.repeat(query_start_loc[1:][sample_rows] - row_counts, row_counts)
            logits_indices[:] = ends + np.arange(num_logits) - np.repeat(first_row, row_counts)
        else:
            logits_indices[:] = query_start_loc[1:][sample_rows] - 1

        device_buf = self._to_device(buf)
        views = [device_buf[offsets[i] : offsets[i] + sizes[i]] for i in range(len(sizes))]
        # Each eager op before a graph replay costs ~2 us of device time at batch 1: a graph step skips
        # the int32 conversions (its input copies convert) and, when every token is a placeholder (a
        # steady decode), the scatter (the graph's ids are gathered from the last samples in one op).
        placeholder_rows = None
        if graph_step and num_placeholders == num_attn:
            placeholder_rows = views[8]
        elif num_placeholders:
            views[0][views[7]] = self._last_sampled[views[8]]  # on the device: no wait for the last step
        if num_lora:  # each token's adapter slot, the tokens by slot: where the projections (and graphs) read them
            self.lora_manager.load_step(views[11])

        def int32(t: torch.Tensor) -> torch.Tensor:
            return t if graph_step or mixed_graph_step else t.to(torch.int32)

        meta = AttentionMetadata(
            query_start_loc=int32(views[3]),
            seq_lens=int32(views[4]),
            block_tables=int32(views[5].view(num_attn, width)),
            slot_mapping=views[2],
            max_query_len=int(attn_query_lens.max()) if num_seqs else 0,
            max_seq_len=int(attn_seq_lens.max()) if num_seqs else 0,
            block_size=self.block_size,
            query_lens_cpu=attn_query_lens.tolist(),
            seq_lens_cpu=attn_seq_lens.tolist(),
            is_decode_only=is_decode_only,
            seq_order=int32(views[9]) if num_order else None,
            decode_work=int32(views[10].view(6, -1)) if num_work else None,
        )
        if groups:
            tables_view, slots_view = views[12].view(groups, table_row), views[13].view(groups, slots_row)
            meta.windows = [dataclasses.replace(meta, block_tables=int32(tables_view[k, :num_attn * width].view(
                num_attn, width)), slot_mapping=slots_view[k, :padded_tokens]) for k in range(groups)]
        ctx = ForwardContext(attn_metadata=meta, kv_caches=self.kv_caches, backend=self.backend)
        return StepInputs(views[0], views[1], ctx, views[6], num_logits, graph_step, placeholder_rows,
                          mixed_graph_step, prompt_plan, pool_rows, lora_any)

    def allocate_cpu_kv_tier(self, num_blocks: int) -> None:
        """The CPU tier of KV offloading: num_blocks blocks of every layer's K/V in host memory (pinned on CUDA)."""
        pin = self.device.type == "cuda"
        self.cpu_kv_caches = [torch.zeros((2, num_blocks, *cache.shape[2:]), dtype=cache.dtype, pin_memory=pin)
                              for cache in self.kv_caches]

    def _copy_kv_tiers(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        """KV offloading's copies, before the step's forward: evicted device blocks' K/V to their CPU slots (the
        device-to-host copy waits for the steps queued before it; none of them writes a free block), then CPU slots
        to the device blocks a prefix hit took (queued ahead of the forward that reads them)."""
        if self.cpu_kv_caches is None:
            raise RuntimeError("the scheduler asked for KV copies, but this runner has no CPU tier")
        if copies_out:
            src = torch.tensor([b for b, _ in copies_out], device=self.device)
            dst = torch.tensor([slot for _, slot in copies_out])
            for cache, cpu in zip(self.kv_caches, self.cpu_kv_caches, strict=True):
                cpu[:, dst] = cache[:, src].to("cpu")
        if copies_in:
            src = torch.tensor([slot for slot, _ in copies_in])
            dst = torch.tensor([b for _, b in copies_in], device=self.device)
            for cache, cpu in zip(self.kv_caches, self.cpu_kv_caches, strict=True):
                cache[:, dst] = cpu[:, src].to(self.device, non_blocking=True)

    def _placeholder_sources(
        self, scheduled: list[ScheduledRequest], query_start_loc: np.ndarray, dst: np.ndarray
    ) -> np.ndarray:
        """For each placeholder token (flat index in dst), its row in the last step's samples."""
        if not len(dst):
            return dst
        request_index = np.searchsorted(query_start_loc, dst, side="right") - 1
        try:
            return np.fromiter((self._last_sample_rows[scheduled[i].request_id] for i in request_index),
                               dtype=np.int64, count=len(dst))
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]} has a placeholder token, but the last step did not "
                               "sample for it") from None

    def _host_view(self, size: int) -> np.ndarray:
        """A reusable int64 host buffer of at least `size` (pinned on CUDA, so the copy is async).
        The two buffers alternate; one is reused only after the copy that last read it is done."""
        turn = self._turn = 1 - self._turn
        done = self._copy_done[turn]
        if done is not None:
            done.synchronize()  # the copy of two steps ago: long finished in practice
        if self._host_buffers[turn].size < size:
            capacity = max(size, 2 * self._host_buffers[turn].size, 4096)
            if self.device.type == "cuda":
                pinned = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
                self._pinned[turn] = pinned
                self._host_buffers[turn] = pinned.numpy()
            else:
                self._host_buffers[turn] = np.empty(capacity, dtype=np.int64)
        return self._host_buffers[turn][:size]

    @torch.inference_mode()
    def warm_gemm_shapes(self, max_tokens: int, max_seqs: int) -> tuple[int, float]:
        """Runs the first layer's projections at every token count an eager step can have (padded_count's
        ladder) and the LM head at every padded logits count, once, at start-up (CUDA). The first GEMM of
        a shape costs host time for cuBLAS's algorithm choice (~0.3 ms a projection) and for loading
        kernels not used before: ~175 ms for the bench workloads' one 7,680-token step, through which the
        device idled (docs/gpu-notes.md, session 5). Returns (token counts warmed, seconds)."""
        from pagedserve.executor.layers import Linear

        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if self.device.type != "cuda" or not self.pad_eager_steps or not layers:
            return 0, 0.0
        t0 = time.perf_counter()
        linears = [m for m in layers[0].modules() if isinstance(m, Linear)]
        counts = sorted({padded_count(n) for n in range(1, max_tokens + 1)})
        for num in counts:
            for linear in linears:
                linear(torch.zeros(num, linear.in_features, dtype=self.dtype, device=self.device))
        hidden_size = int(self.hf_config.hidden_size)
        for num in sorted({padded_count(n) for n in range(1, max_seqs + 1)}):
            self.model.local_logits(torch.zeros(num, hidden_size, dtype=self.dtype, device=self.device))
        torch.cuda.synchronize(self.device)
        return len(counts), time.perf_counter() - t0

    def warm_prefill_variants(self) -> int:
        """Launches the prefill attention kernel once (on a few dummy tokens, reading the real cache) in every tile
        configuration a step can pick (default_prefill_config: row tiles 16-128, short or long keys) and both
        modes (with or without the decodes of a mixed batch), so none of them compiles while serving. Graph
        capture and the warm-up script reach only some: on the H200 an eager step of several ~1k-token prompts
        compiled two variants at 0.64 s each under the first burst of requests (docs/gpu-notes.md, session 11).
        Returns the number of launches (0 off CUDA or without the Triton backend)."""
        if self.device.type != "cuda" or getattr(self.backend, "name", "") != "triton" or not self.kv_caches:
            return 0
        from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill

        kv_cache = self.kv_caches[0]
        num_kv_heads, head_dim = kv_cache.shape[3:]
        num_heads = int(self.hf_config.num_attention_heads) // tp_size()  # this rank's
        tokens = 16
        query = torch.zeros(tokens, num_heads, head_dim, dtype=self.dtype, device=self.device)
        query_start_loc = torch.tensor([0, tokens], dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        block_tables = torch.zeros(1, 16, dtype=torch.int32, device=self.device)
        launches = 0
        for max_seq_len, max_query_len in prefill_warm_probes(head_dim, num_heads // num_kv_heads):
            for skip_decodes in (False, True):
                paged_attention_prefill(query, kv_cache, query_start_loc, seq_lens, block_tables, 1.0,
                                        max_query_len, skip_decodes=skip_decodes, max_seq_len=max_seq_len)
                launches += 1
        return launches

    def _to_device(self, buf: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(buf)
        if self.device.type == "cpu":
            return host.clone()  # the host buffer is reused two steps later
        device_buf = host.to(self.device, non_blocking=True)
        done = self._copy_done[self._turn] = torch.cuda.Event()
        done.record()
        return device_buf

    # --- execution ------------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Runs one step and waits for its sampled tokens."""
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> StepHandle:
        """Queues one step on the device (forward, sampling, the copy of the samples to the host)
        and returns without waiting for it. Steps must be queued in schedule order.
        before_sample: called once the forward is queued and before the sampler reads the step's requests
        (only when the step samples): the engine's host work that the sampling needs, e.g. structured
        outputs' token masks, runs while the device computes the forward."""
        scheduled = scheduler_output.scheduled
        self._finished_ids.extend(scheduler_output.finished_request_ids)
        if scheduler_output.kv_copies_out or scheduler_output.kv_copies_in:
            self._copy_kv_tiers(scheduler_output.kv_copies_out, scheduler_output.kv_copies_in)
        if not scheduled:
            return StepHandle([], None, None, None)
        inputs = self.prepare_inputs(scheduler_output)
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        meta = inputs.ctx.attn_metadata
        prompt_part = pool_part = None
        if inputs.graph_step:
            logits = self.cuda_graphs.run(inputs.input_ids, inputs.positions, meta,
                                          placeholder_rows=inputs.placeholder_rows, last_sampled=self._last_sampled)
        elif inputs.mixed_graph_step:
            logits = self.mixed_graphs.run(inputs.input_ids, inputs.positions, meta, inputs.logits_indices,
                                           inputs.num_logits)
        else:
            hidden = self._eager_forward(inputs)
            if inputs.prompt_plan:
                payload, decode = self._prompt_logprobs(hidden, inputs.prompt_plan, scheduled)
                prompt_part = None if payload is None else (*self._to_host(payload), decode)
            if inputs.pool_rows is not None:
                logit_rows, scheduled_rows = inputs.pool_rows
                rows = inputs.logits_indices[torch.tensor(logit_rows, device=hidden.device)]
                pooled_rows = hidden[rows]
                if getattr(self.model, "score", None) is not None:  # a sequence classifier: its labels' logits
                    pooled_rows = self.model.score(pooled_rows)
                pool_part = (*self._to_host(pooled_rows.float()), scheduled_rows)
            if inputs.num_logits:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])[: inputs.num_logits]
        if inputs.num_logits == 0:  # only non-final prefill chunks this step (never a decode graph step)
            return StepHandle(scheduled, None, None, None, prompt_part=prompt_part)
        if before_sample is not None:
            before_sample()
        to_sample = sampling_rows(scheduled)
        history = StepHistory(self._last_sampled, self._last_sample_rows, self._finished_ids)
        self._finished_ids = []
        result = self.sampler.sample(logits, to_sample, history)
        if tp_size() > 1:  # the other ranks need the ids for the next step's placeholders (async scheduling)
            broadcast_tensor(result.token_ids.to(torch.int64).contiguous())
        self._last_sampled = result.token_ids
        self._last_sample_rows = last_sample_rows(to_sample)
        host, ready = self._to_host(result.payload)
        return StepHandle(scheduled, host, ready, result.decode, started, prompt_part, pool_part)

    def _eager_forward(self, inputs: StepInputs) -> torch.Tensor:
        """The model on an eager step; with LoRA enabled, the adapters' kernels run only if a token has one."""
        manager = self.lora_manager
        if manager is None:
            return self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        manager.active = inputs.lora_any
        try:
            return self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        finally:
            manager.active = True

    def _to_host(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """(host tensor, event recorded after its copy or None): the device-to-host copy of a payload, queued
        without waiting (pinned memory on CUDA)."""
        if self.device.type == "cpu":
            return payload, None
        host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return host, ready

    def _prompt_logprobs(self, hidden: torch.Tensor, plan: list[tuple[int, int, int, int]],
                         scheduled: Sequence[ScheduledRequest]) -> tuple[torch.Tensor, Callable] | tuple[None, None]:
        """Prompt logprobs of the plan's rows (prompt_logprob_plan), of the raw distribution as the sampler's
        logprobs (sampler.logprob_stats): the logprob and rank of the prompt token that follows each row, and the
        top max-k. The LM head runs on max_num_seqs rows at a time (the KV sizing profiled logits of that
        many). Returns (payload, decode) on the rank that holds the logits; (None, None) on the other ranks of
        tensor parallelism, which take part in the same LM-head gathers."""
        rows = np.concatenate([np.arange(first_row, first_row + count) for _, first_row, _, count in plan])
        targets = np.concatenate([np.asarray(scheduled[i].prompt_token_ids[first:first + count], dtype=np.int64)
                                  for i, _, first, count in plan])
        max_k = max(scheduled[i].sampling_params.prompt_logprobs for i, *_ in plan)
        rows_d, targets_d = (torch.from_numpy(a).to(hidden.device, non_blocking=True) for a in (rows, targets))
        chunk = max(1, self.config.max_num_seqs)
        tok_lps, ranks, top_lps, top_ids = [], [], [], []
        for s in range(0, len(rows), chunk):
            logits = self.model.compute_logits(hidden[rows_d[s:s + chunk]])
            if logits is None:  # not the rank that gathers the vocabulary
                continue
            tok_lp, rank, top_lp, top_id = logprob_stats(logits, targets_d[s:s + chunk], max_k)
            tok_lps.append(tok_lp)
            ranks.append(rank)
            top_lps.append(top_lp.flatten())
            top_ids.append(top_id.flatten())
        if not tok_lps:
            return None, None
        # One payload, float64 (token ids stay exact): [logprob N | rank N | top logprobs N*k | top ids N*k].
        payload = torch.cat([t.double() for t in tok_lps + ranks + top_lps + top_ids])
        num = len(rows)

        def decode(host: list) -> list[tuple[int, list[TokenLogprobs]] | None]:
            out: list[tuple[int, list[TokenLogprobs]] | None] = [None] * len(scheduled)
            row = 0
            for i, _, first, count in plan:
                k = scheduled[i].sampling_params.prompt_logprobs
                entries = []
                for r in range(row, row + count):
                    top = 2 * num + r * max_k
                    entries.append(TokenLogprobs(
                        token_id=int(targets[r]), logprob=finite_or(host[r]), rank=int(host[num + r]),
                        top=[(int(host[top + num * max_k + q]), finite_or(host[top + q])) for q in range(k)]))
                out[i] = (first, entries)
                row += count
            return out

        return payload, decode

    @torch.inference_mode()
    def forward_only(self, scheduler_output: SchedulerOutput) -> None:
        """The step's forward and this rank's logits slice, without sampling: ranks 1..N-1 of tensor
        parallelism, whose layers take part in rank 0's all-reduces (eager steps) and whose logits join rank
        0's by a gather. Rank 0's sampled ids then arrive by broadcast and stand in for the next step's
        placeholders, as rank 0's own do."""
        if scheduler_output.kv_copies_out or scheduler_output.kv_copies_in:  # this rank's slice of each block
            self._copy_kv_tiers(scheduler_output.kv_copies_out, scheduler_output.kv_copies_in)
        if scheduler_output.is_empty:
            return
        inputs = self.prepare_inputs(scheduler_output)
        if inputs.graph_step or inputs.mixed_graph_step:
            raise RuntimeError("tensor-parallel ranks run eager steps only")
        hidden = self._eager_forward(inputs)
        if inputs.prompt_plan:  # the same LM-head gathers as rank 0's prompt logprobs
            self._prompt_logprobs(hidden, inputs.prompt_plan, scheduler_output.scheduled)
        if inputs.num_logits:  # this rank's slice of the vocabulary, gathered on rank 0
            self.model.compute_logits(hidden[inputs.logits_indices])
        to_sample = sampling_rows(scheduler_output.scheduled)
        if to_sample:  # rank 0 sampled exactly these rows (its logits rows are the same requests)
            self._last_sampled = broadcast_tensor(torch.empty(len(to_sample), dtype=torch.int64, device=self.device))
            self._last_sample_rows = last_sample_rows(to_sample)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int,
                            max_num_batched_tokens: int | None = None) -> float:
        """Captures decode graphs for a ladder of batch sizes and, unless PAGEDSERVE_MIXED_GRAPHS=0,
        mixed-step graphs for a ladder of token counts (in the same memory pool); returns the seconds."""
        from pagedserve.executor.cuda_graph import CUDAGraphDecoder
        from pagedserve.executor.mixed_graph import MAX_MIXED_GRAPH_TOKENS, CUDAGraphMixed

        if not self.backend.capturable:  # e.g. --attention-backend torch on a GPU: its steps run eagerly
            logger.warning("the %s attention backend cannot be captured in CUDA graphs: steps run eagerly",
                           self.backend.name)
            return 0.0
        self.graph_capture_args = (max_num_seqs, max_model_len, max_num_batched_tokens)  # (sleep mode recaptures)
        graphs = CUDAGraphDecoder(self.model, self.kv_caches, self.backend, max_num_seqs, max_model_len,
                                  self.block_size, self.device, num_window_groups=self.num_window_groups)
        elapsed = graphs.capture()
        self.cuda_graphs = graphs
        max_tokens = min(MAX_MIXED_GRAPH_TOKENS, max_num_batched_tokens or MAX_MIXED_GRAPH_TOKENS)
        if os.environ.get("PAGEDSERVE_MIXED_GRAPHS", "1") != "0" and max_tokens >= 16:
            # (Speculative decoding: each drafted token is an attention sequence with its logits row.)
            rows = max_num_seqs * rows_per_sequence(self.config)
            mixed = CUDAGraphMixed(self.model, self.kv_caches, self.backend, rows, max_model_len,
                                   self.block_size, self.device, max_tokens,
                                   num_window_groups=self.num_window_groups)
            elapsed += mixed.capture(pool=graphs.pool)
            self.mixed_graphs = mixed
        return elapsed


# --- KV cache sizing ----------------------------------------------------------------------------


def determine_num_blocks(
    config: EngineConfig,
    model: nn.Module,
    hf_config: Any,
    device: torch.device | str,
    dtype: torch.dtype,
    max_num_batched_tokens: int | None = None,
    *,
    block_size: int | None = None,
    max_model_len: int | None = None,
    extra_bytes_per_block: int = 0,
) -> int:
    """How many KV blocks to allocate.

    config.num_kv_blocks wins. On CPU: config.cpu_kv_cache_gib worth of blocks. On CUDA: run a
    dummy forward of max_num_batched_tokens to measure peak activation memory, then fill what is
    left up to gpu_memory_utilization of the device with blocks.
    """
    block_size = block_size or config.block_size
    device = torch.device(device)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    bytes_per_block = (kv_cache_bytes_per_block(hf_config, block_size, kv_cache_dtype_of(config, dtype))
                       + extra_bytes_per_block)  # (a draft model's cache of as many blocks)
    if device.type != "cuda":
        return max(1, int(config.cpu_kv_cache_gib * 2**30) // bytes_per_block)

    num_tokens = max_num_batched_tokens or config.max_num_batched_tokens or 8192
    seq_len = min(num_tokens, max_model_len or config.max_model_len or hf_config.max_position_embeddings)
    peak_activation = _profile_peak_activation_bytes(config, model, hf_config, device, dtype, block_size,
                                                     num_tokens, seq_len)
    free, total = torch.cuda.mem_get_info(device)
    # total - free: weights, CUDA context, allocator cache and other processes, as of now.
    budget = total * config.gpu_memory_utilization - (total - free) - peak_activation
    num_blocks = int(budget // bytes_per_block)
    logger.info("memory profile: %.2f GiB total, %.2f GiB in use, %.2f GiB activation peak -> %d KV blocks",
                total / 2**30, (total - free) / 2**30, peak_activation / 2**30, num_blocks)
    if num_blocks < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB at "
            f"gpu_memory_utilization={config.gpu_memory_utilization}); raise gpu_memory_utilization, "
            "lower max_num_batched_tokens, or use a smaller model"
        )
    return num_blocks


@torch.inference_mode()
def _profile_peak_activation_bytes(
    config: EngineConfig, model: nn.Module, hf_config: Any, device: torch.device, dtype: torch.dtype,
    block_size: int, num_tokens: int, seq_len: int,
) -> int:
    """Peak memory above the steady state during a forward of num_tokens (as prefills of seq_len)
    plus logits for up to max_num_seqs rows (times 1 + num_speculative_tokens with speculative decoding)."""
    num_seqs = (num_tokens + seq_len - 1) // seq_len
    query_lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
    blocks_per_seq = (seq_len + block_size - 1) // block_size
    # All sequences share one scratch cache region: overwriting is harmless, only sizes matter.
    kv_caches = allocate_kv_caches(hf_config, blocks_per_seq, block_size, device, kv_cache_dtype_of(config, dtype))
    positions = torch.cat([torch.arange(q, device=device) for q in query_lens])
    query_start_loc = torch.tensor([0, *np.cumsum(query_lens).tolist()], dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        block_tables=torch.arange(blocks_per_seq, dtype=torch.int32, device=device).repeat(num_seqs, 1),
        slot_mapping=positions.clone(),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        block_size=block_size,
        query_lens_cpu=query_lens,
        seq_lens_cpu=query_lens,
    )
    ctx = ForwardContext(meta, kv_caches, select_attention_backend(config, device))
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)

    from pagedserve.executor.precompile import compile_ahead

    num_rows = min(config.max_num_seqs * rows_per_sequence(config), num_tokens)
    with compile_ahead("KV sizing") as dry:  # its kernel variants compile side by side first
        if dry:
            model.compute_logits(model(input_ids, positions, ctx)[-num_rows:])
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    hidden = model(input_ids, positions, ctx)
    logits = model.compute_logits(hidden[-num_rows:])
    torch.softmax(logits, dim=-1)  # the sampler holds a few [rows, vocab] fp32 tensors like this
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del hidden, logits, kv_caches, ctx
    torch.cuda.empty_cache()
    # The sampler's penalty history (sampler.PenaltyHistory) grows, while serving, to an int32 and a bool row of
    # the vocabulary per penalized request of a step: kept out of the KV budget (~0.2 GB at 256 x 152k).
    history = config.max_num_seqs * int(hf_config.vocab_size) * 5
    return int(peak) + history
