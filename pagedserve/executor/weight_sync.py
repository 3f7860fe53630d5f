"""New weights broadcast by a trainer's process (SGLang's init_weights_update_group / update_weights_from_distributed):
the reinforcement-learning loop where the policy trains on other GPUs and each step's weights reach the engine over
NCCL (gloo on CPU) instead of through the disk.

The trainer and the engine meet in a process group of their own, outside torch.distributed's default group (the
engine's tensor-parallel world, if any, is a different one): both sides rendezvous at tcp://master_address:master_port
(the trainer, rank 0, hosts the store), the store prefixed by the group's name, as the stateless-group recipe of the
RL frameworks (OpenRLHF, verl, SGLang's examples) does, so a trainer written for them joins unchanged. An engine is
one rank of that group (`rank_offset`): with tensor parallelism its rank 0 receives every tensor and passes the
ranks their slices (Worker.load_weights' chunks).

An update names the tensors, their dtypes and shapes in the order the trainer broadcasts them (from rank 0); the
engine receives each into a buffer on its device and copies it into the model in place, one at a time (no second copy
of the whole model). If the update fails half-way (a name or shape the model lacks), the remaining broadcasts are
still received, so the trainer does not wait forever, and the error is raised after.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def join_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str,
               timeout_s: float = 120.0) -> Any:
    """This process's place in a stateless process group (see the module docstring); blocks until every rank came
    or the timeout passed (RuntimeError then)."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # (group ranks are the ranks: broadcast's src)
    return group


def parse_update(names: Any, dtypes: Any, shapes: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The tensors an update announces; ValueError (before anything is received) for lists that do not line up, a
    dtype not in _DTYPES, or a shape that is not a list of non-negative integers."""
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError("names, dtypes and shapes must be lists")
    if not names or not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes must be non-empty lists of one length, got {len(names)}, "
                         f"{len(dtypes)} and {len(shapes)}")
    out = []
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        if not isinstance(name, str) or not name:
            raise ValueError(f"each name must be a non-empty string, got {name!r}")
        key = str(dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"{name}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                           for d in shape):
            raise ValueError(f"{name}: shape must be a list of non-negative integers, got {shape!r}")
        out.append((name, _DTYPES[key], tuple(shape)))
    return out


class BroadcastStream:
    """The announced tensors, each received (broadcast from rank 0 of `group`) when the loader asks for it;
    `drain()` receives what the loader did not take."""

    def __init__(self, group: Any, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], device: torch.device
                 ) -> None:
        self.group = group
        self.tensors = tensors
        self.device = device
        self.next = 0

    def _receive(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        import torch.distributed as dist

        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(buffer, src=0, group=self.group)
        return buffer

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self.next < len(self.tensors):
            name, dtype, shape = self.tensors[self.next]
            self.next += 1
            yield name, self._receive(dtype, shape)

    def drain(self) -> int:
        left = len(self.tensors) - self.next
        for _ in self:
            pass
        return left
