"""Where start-up's Triton compile time goes (diagnostics): PAGEDSERVE_LOG_COMPILES=1.

On a fresh machine most of `pagedserve serve`'s start-up is Triton compiling kernel variants during KV
sizing, graph capture and warm-up (docs/gpu-notes.md). With the switch on, a compilation listener
(triton.knobs.compilation.listener) records each compile, and `summary()` gives, since the last call,
the number of compiles, their seconds and the slowest kernels; the worker and the engine append it to
their start-up log lines.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

_LOG: CompileLog | None = None


class CompileLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[tuple[str, float, bool]] = []  # (kernel name, seconds, cache hit)
        self._mark = 0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit: bool) -> None:
        name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "?")
        with self._lock:
            self._records.append((str(name), times.total / 1e6, bool(cache_hit)))

    def summary(self) -> str:
        """Compiles since the last summary: count, seconds, cache hits, the five slowest kernels."""
        with self._lock:
            new, self._mark = self._records[self._mark :], len(self._records)
        compiled = [(n, s) for n, s, hit in new if not hit]
        hits = len(new) - len(compiled)
        by_kernel: dict[str, list[float]] = defaultdict(list)
        for name, seconds in compiled:
            by_kernel[name].append(seconds)
        top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:5]
        detail = ", ".join(f"{name} x{len(s)} {sum(s):.1f} s" for name, s in top)
        return (f"Triton: {len(compiled)} compiles, {sum(s for _, s in compiled):.1f} s, {hits} cache hits"
                + (f" ({detail})" if detail else ""))


def install() -> CompileLog | None:
    """Installs the listener once when PAGEDSERVE_LOG_COMPILES=1 (and this Triton has the knob)."""
    global _LOG
    if _LOG is not None or os.environ.get("PAGEDSERVE_LOG_COMPILES") != "1":
        return _LOG
    try:
        import triton

        compilation = triton.knobs.compilation
    except (ImportError, AttributeError):
        return None
    _LOG = CompileLog()
    compilation.listener = _LOG
    return _LOG


def summary_suffix() -> str:
    """'; Triton: ...' for a start-up log line, or '' when the switch is off."""
    return f"; {_LOG.summary()}" if _LOG is not None else ""


__all__ = ["CompileLog", "install", "summary_suffix"]
