"""Sleep mode (vLLM's `enable_sleep_mode`): a runner gives its device memory back between generations and takes it
again on wake-up, e.g. while a reinforcement-learning loop trains on the same GPU.

- level 1: the weights are copied to (pinned) host memory and their device storage is freed; the KV cache is
  freed. Waking up copies the weights back: the same model as before.
- level 2: the weights (parameters) are discarded, not copied; the model's buffers (rotary tables) still go to
  host memory. Waking up gives zeroed weights: load new ones (`load_weights`) before generating.
- either level frees the KV cache (waking up gives it back zeroed; the prefix cache was reset before sleeping)
  and the CUDA graphs with their memory pool; they are captured again once weights and cache are both awake.

Each storage is freed in place (`UntypedStorage.resize_(0)`) and grown back in place, so every tensor and view on it
stays the same object: modules, the fused projections' slices, the attention metadata's cache list. Storages shared by
several tensors (tied embeddings, slices) are handled once. `wake_up(tags)` may wake the weights first (to load new
ones while the cache still sleeps: a lower peak), then the cache.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

TAGS = ("weights", "kv_cache")


def _unique_storages(tensors: Iterable[torch.Tensor], skip: set[int] | None = None) -> list[torch.UntypedStorage]:
    """The distinct allocated storages under `tensors` (by data pointer), minus those in `skip`."""
    found: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in found or (skip is not None and key in skip):
            continue
        found[key] = storage
    return list(found.values())


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Stash:
    """Storages freed in place, with their sizes and (for those kept) host copies."""

    def __init__(self, storages: list[torch.UntypedStorage], keep: list[bool]) -> None:
        self.entries: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []
        for storage, kept in zip(storages, keep, strict=True):
            if not storage.resizable():
                raise ValueError("sleep: a weight's memory cannot be freed in place (a read-only mapping)")
            copy = None
            if kept:
                pin = storage.device.type == "cuda"
                copy = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
                copy.copy_(_bytes_view(storage))
            self.entries.append((storage, storage.nbytes(), copy))
        for storage, _, _ in self.entries:
            storage.resize_(0)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n, _ in self.entries)

    def restore(self) -> None:
        for storage, nbytes, copy in self.entries:
            storage.resize_(nbytes)
            view = _bytes_view(storage)
            if copy is None:
                view.zero_()
            else:
                view.copy_(copy, non_blocking=True)
        self.entries = []


class RunnerSleep:
    """Sleep state of one ModelRunner (the target's, a draft's, a tensor-parallel rank's)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.weights: _Stash | None = None  # set while the weights sleep
        self.kv: _Stash | None = None  # set while the KV cache sleeps
        self.level = 0
        self.num_params = 0  # the weights stash's first entries: the parameters' storages
        self._graphs_dropped = False

    @property
    def asleep(self) -> bool:
        return self.weights is not None or self.kv is not None

    def sleep(self, level: int) -> int:
        """Frees the runner's device memory as `level` says (no-op for what already sleeps); returns the bytes
        freed."""
        t0 = time.monotonic()
        runner = self.runner
        device = runner.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        freed = 0
        self._drop_graphs()
        if self.kv is None:
            kv = _unique_storages(runner.kv_caches)
            self.kv = _Stash(kv, [False] * len(kv))
            freed += self.kv.nbytes
        if self.weights is None:
            model = runner.model
            params = _unique_storages(model.parameters())
            buffers = _unique_storages(model.buffers(), skip={s.data_ptr() for s in params})
            # Level 1 keeps everything; level 2 only the buffers (computed at load, not in a checkpoint).
            self.weights = _Stash(params + buffers, [level == 1] * len(params) + [True] * len(buffers))
            self.num_params = len(params)
            freed += self.weights.nbytes
            self.level = level
        elif level == 2 and self.level == 1:  # deeper: forget the host copies of the parameters
            entries = self.weights.entries
            entries[: self.num_params] = [(s, n, None) for s, n, _ in entries[: self.num_params]]
            self.level = 2
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("sleep mode: level %d, %.2f GiB of %s memory freed in %.2f s", level, freed / 2**30, device.type,
                    time.monotonic() - t0)
        return freed

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        tags = set(TAGS if tags is None else tags)
        runner = self.runner
        if "weights" in tags and self.weights is not None:
            self.weights.restore()
            self.weights = None
            self.level = 0
        if "kv_cache" in tags and self.kv is not None:
            self.kv.restore()
            self.kv = None
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        if not self.asleep and self._graphs_dropped:
            self._graphs_dropped = False
            args = getattr(runner, "graph_capture_args", None)
            if args is not None:
                seconds = runner.capture_cuda_graphs(*args)
                logger.info("sleep mode: CUDA graphs captured again in %.1f s", seconds)

    def _drop_graphs(self) -> None:
        runner = self.runner
        if runner.cuda_graphs is not None or runner.mixed_graphs is not None:
            runner.cuda_graphs = None  # (their pool holds activations at addresses a wake-up may not give back)
            runner.mixed_graphs = None
            self._graphs_dropped = True

