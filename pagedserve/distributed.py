"""Tensor parallelism (Megatron-style) over torch.distributed: this process's rank, the group, and the
collectives the model and the engine need.

    rank 0: engine + scheduler + its shard        ranks 1..N-1: a shard each (executor/tp_worker.py)
      Worker.execute(step) ── broadcast(step) ──►   runner.forward_only(step)
      runner.execute(step)  ◄─ all_reduce after o_proj and down_proj, every layer ─►
      sample on rank 0      ── broadcast(sampled ids) ──►  kept for the next step's placeholders

A layer's q/k/v heads and MLP columns are split across ranks (column-parallel), o_proj and down_proj
take the matching input slice (row-parallel) and their partial outputs are summed with one all-reduce
each. The vocabulary is split too: each rank embeds the ids in its slice (an all-reduce adds the rows) and
computes its slice of the logits (gathered on rank 0). Norms are whole on every rank. The KV cache of a rank
holds its own kv heads, so a block id means the same token slots on every rank and one scheduler serves them
all.

Tensors move over NCCL on CUDA and over gloo on CPU; step descriptions (pickled SchedulerOutputs) always
over a gloo group. With one rank (the default) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(slots=True)
class _TPState:
    rank: int = 0
    size: int = 1
    group: Any = None  # the tensors' group (NCCL on CUDA, gloo on CPU)
    cpu_group: Any = None  # gloo: pickled step descriptions


_STATE = _TPState()


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """Within it, this process acts as the only rank (no shards, no collectives): rank 0 builds and runs a model of
    its own beside the tensor-parallel one (speculative decoding's draft model)."""
    saved = (_STATE.rank, _STATE.size)
    _STATE.rank, _STATE.size = 0, 1
    try:
        yield
    finally:
        _STATE.rank, _STATE.size = saved


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.size


def shard(total: int, what: str) -> int:
    """This rank's share of `total` (heads, columns); ValueError unless the ranks divide it."""
    if total % _STATE.size:
        raise ValueError(f"tensor_parallel_size {_STATE.size} does not divide {what} ({total})")
    return total // _STATE.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x across the ranks in place (row-parallel partial outputs); returns x."""
    if _STATE.size > 1:
        dist.all_reduce(x, group=_STATE.group)
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_tensor_parallel(rank: int, size: int, port: int, device: torch.device, timeout_s: float = 600.0) -> None:
    """Joins the group of `size` ranks that rendezvous at 127.0.0.1:port (one host)."""
    if size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _STATE.rank, _STATE.size, _STATE.group, _STATE.cpu_group = rank, size, group, cpu_group


def destroy_tensor_parallel() -> None:
    if _STATE.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.rank, _STATE.size, _STATE.group, _STATE.cpu_group = 0, 1, None, None


@dataclass(slots=True)
class RankCall:
    """A call rank 0 makes on every other rank between steps (executor/tp_worker.py runs it): "sleep" (level),
    "wake_up" (tags), "load_weights" (path: a safetensors folder each rank reads; or pairs: a chunk of (name, CPU
    tensor)). (Here, not in tp_worker.py: the ranks run that module as __main__, where its classes unpickle as others.)
    """

    method: str
    kwargs: dict


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0 sends obj to every rank; each rank returns it (rank 0 its own)."""
    if _STATE.size == 1:
        return obj
    if _STATE.rank == 0:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        dist.broadcast(length, src=0, group=_STATE.cpu_group)
        dist.broadcast(payload, src=0, group=_STATE.cpu_group)
        return obj
    length = torch.empty(1, dtype=torch.int64)
    dist.broadcast(length, src=0, group=_STATE.cpu_group)
    payload = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=_STATE.cpu_group)
    return pickle.loads(payload.numpy().tobytes())


def vocab_shard(vocab_size: int) -> tuple[int, int]:
    """(first id, rows) of this rank's slice of a vocabulary split over the ranks: ceil(V / N) rows each; the
    last rank's rows past V are padding (zero embeddings, logits dropped after the gather)."""
    rows = -(-vocab_size // _STATE.size)
    return _STATE.rank * rows, rows


def gather_last_dim(x: torch.Tensor, full: int) -> torch.Tensor | None:
    """Rank 0: every rank's x joined along the last dim, cut to `full` columns (the vocabulary-parallel LM
    head's logits); the other ranks send theirs and get None."""
    if _STATE.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_STATE.size)] if _STATE.rank == 0 else None
    dist.gather(x, parts, dst=0, group=_STATE.group)
    return torch.cat(parts, dim=-1)[..., :full] if parts is not None else None


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x into every rank's x (same shape and dtype, on the ranks' devices), in place; returns x. On
    CUDA an NCCL broadcast queued on the stream: no host wait, so async scheduling keeps its overlap."""
    if _STATE.size > 1:
        dist.broadcast(x, src=0, group=_STATE.group)
    return x


def min_across_ranks(value: int) -> int:
    """The smallest of every rank's value (e.g. KV blocks that fit), known to all ranks."""
    if _STATE.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return int(t.item())


__all__ = [
    "all_reduce",
    "broadcast_object",
    "broadcast_tensor",
    "destroy_tensor_parallel",
    "free_port",
    "gather_last_dim",
    "init_tensor_parallel",
    "min_across_ranks",
    "shard",
    "single_rank",
    "tp_rank",
    "tp_size",
    "vocab_shard",
]
