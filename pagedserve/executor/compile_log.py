"""Triton compiles: where start-up's compile time goes (PAGEDSERVE_LOG_COMPILES=1), and any compile while serving.

On a fresh machine most of `pagedserve serve`'s start-up is Triton compiling kernel variants during KV
sizing, graph capture and warm-up (docs/gpu-notes.md). A compilation listener
(triton.knobs.compilation.listener) records each compile. With the switch on, `summary()` gives, since the
last call, the number of compiles, their seconds and the slowest kernels; the worker and the engine append it
to their start-up log lines.

Once the engine is ready (`mark_serving()`), a compile is a stall of a running step for as long as it takes
(a second or more): the warm-up is meant to leave none. Each one is logged as a warning, with the kernel's
specialization (which int arguments Triton took as 1 or as multiples of 16, and the constexprs), so a
variant that the warm-up missed can be named and added to it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict

logger = logging.getLogger(__name__)
_LOG: CompileLog | None = None


class CompileLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[tuple[str, float, bool]] = []  # (kernel name, seconds, cache hit)
        self._mark = 0
        self.serving = False  # set by mark_serving(): compiles from then on are logged as warnings
        self.serving_compiles = 0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit: bool) -> None:
        name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "?")
        seconds = times.total / 1e6
        with self._lock:
            self._records.append((str(name), seconds, bool(cache_hit)))
            late = self.serving and not cache_hit
            if late:
                self.serving_compiles += 1
        if late:
            logger.warning("Triton compiled %s while serving (%.2f s; the step waited): %s", name, seconds,
                           describe(src))

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


def describe(src) -> str:
    """A compiled variant's specialization, by argument name where Triton says them: constexpr values, and the
    int / pointer arguments it specialized (tt.divisibility 16: a multiple of 16 or 16-byte aligned)."""
    fn = getattr(src, "fn", None)
    names = list(getattr(fn, "arg_names", None) or [])

    def arg(key) -> str:
        index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        return names[index] if isinstance(index, int) and 0 <= index < len(names) else str(key)

    constexprs = getattr(src, "constants", None) or {}  # Triton's ASTSource: {(arg index,): value}
    attrs = getattr(src, "attrs", None) or {}
    parts = [f"{arg(k)}={v}" for k, v in constexprs.items()]
    divisible = [arg(k) for k, v in attrs.items() if any("divisibility" in str(a) for a in v)]
    if divisible:
        parts.append("multiples of 16: " + ",".join(divisible))
    return "; ".join(parts)[:1500] or "(no specialization recorded)"


def mark_serving() -> None:
    """From now on, each Triton compile is logged as a warning (the engine calls this once it is ready)."""
    if _LOG is not None:
        _LOG.serving = True


def serving_compiles() -> int:
    """Compiles since mark_serving() (0 when no listener is installed)."""
    return _LOG.serving_compiles if _LOG is not None else 0


def install() -> CompileLog | None:
    """Installs the listener once (where this Triton has the knob and it is not the interpreter): it records
    every compile; start-up summaries are printed only with PAGEDSERVE_LOG_COMPILES=1."""
    global _LOG
    if _LOG is not None or os.environ.get("TRITON_INTERPRET") == "1":
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
    if _LOG is None or os.environ.get("PAGEDSERVE_LOG_COMPILES") != "1":
        return ""
    return f"; {_LOG.summary()}"


__all__ = ["CompileLog", "describe", "install", "mark_serving", "serving_compiles", "summary_suffix"]
