"""Python's cyclic garbage collector around the serving loop.

After start-up a process holds a few hundred thousand objects that live until it exits (modules, the
tokenizer, the model's modules, jinja templates, pydantic schemas). Every full collection walks all
of them: ~100 ms on the 2-core CI machine, tens of ms on a GPU host, a stall of several decode steps
when it lands inside the step loop. ``freeze_startup_objects`` moves them out of the collector's
reach once start-up is done (vLLM does the same); objects made later are collected as usual.
``PAGEDSERVE_GC_FREEZE=0`` turns it off. ``GcMonitor`` counts the collections and their pauses.
"""

from __future__ import annotations

import gc
import logging
import os
import time

logger = logging.getLogger(__name__)


def freeze_enabled() -> bool:
    return os.environ.get("PAGEDSERVE_GC_FREEZE", "1") != "0"


def freeze_startup_objects(where: str) -> int:
    """Collects once, then freezes every object alive now; returns how many are frozen (0: off)."""
    if not freeze_enabled():
        return 0
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    logger.info("%s: %d start-up objects frozen out of the garbage collector (%.0f ms)", where, count,
                1e3 * (time.perf_counter() - t0))
    return count


def unfreeze_and_collect() -> None:
    """Gives frozen objects back to the collector and collects: before freeing a frozen engine, whose
    reference cycles the collector would otherwise never look at."""
    gc.unfreeze()
    gc.collect()


class GcMonitor:
    """Counts the garbage collections between start() and stop(), by generation, and their pauses."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self.max_seconds = 0.0
        self.frozen_objects = 0  # frozen when the monitor started
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            pause = time.perf_counter() - self._t0
            self.counts[info["generation"]] += 1
            self.seconds += pause
            self.max_seconds = max(self.max_seconds, pause)

    def start(self) -> GcMonitor:
        self.frozen_objects = gc.get_freeze_count()
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> dict:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        return self.summary()

    def summary(self) -> dict:
        return {"gc_collections": list(self.counts), "gc_pause_ms": 1e3 * self.seconds,
                "gc_max_pause_ms": 1e3 * self.max_seconds, "gc_frozen_objects": self.frozen_objects}

    def line(self) -> str:
        s = self.summary()
        return (f"gc: {sum(self.counts)} collections (gen0/1/2 {'/'.join(map(str, self.counts))}), "
                f"{s['gc_pause_ms']:.1f} ms paused, longest {s['gc_max_pause_ms']:.1f} ms, "
                f"{s['gc_frozen_objects']} objects frozen")
