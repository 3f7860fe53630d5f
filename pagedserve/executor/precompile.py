"""Compile a phase's Triton kernel variants in parallel before running the phase (start-up time).

On a fresh machine, start-up is mostly Triton compiling ~25 kernel variants one after another, as
graph capture and the engine's warm-up first launch each of them (docs/gpu-notes.md, session 4). Here
the phase's work runs once as a *dry run*: every Triton launch becomes a compile-only `warmup` call,
submitted to a thread pool through Triton's AsyncCompileMode, so the variants compile side by side
(the compiler's C++ passes and ptxas run outside the GIL); torch ops still run, on data the skipped
kernels never wrote, which is fine because nothing on the host depends on it (the step's token ids
stay in range whatever the logits hold). Leaving the block waits for every compile and installs the
kernels in their caches; the real phase then finds them all compiled.

    with compile_ahead():        # no-op where unsupported (CPU, an older Triton, PAGEDSERVE_PRECOMPILE=0)
        run_the_phase_once()     # launches become compiles
    run_the_phase_once()         # for real

The dry run launches no Triton kernel and writes nothing through one; a phase whose host logic read
back a Triton kernel's output would see garbage, so only phases without such reads belong here. A
kernel whose output feeds indices into later torch ops (the fused sampler's token ids feed the next
step's embedding lookup) checks `dry_run()` and writes a valid placeholder instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)
_dry_run = False  # inside compile_ahead's block (the engine steps on one thread)


def dry_run() -> bool:
    """Whether Triton launches are being turned into compiles right now (they write nothing)."""
    return _dry_run


def supported() -> bool:
    if os.environ.get("PAGEDSERVE_PRECOMPILE", "1") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from triton.runtime import _async_compile  # noqa: F401
        from triton.runtime.jit import KernelInterface  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def compile_ahead(name: str = "phase", workers: int | None = None) -> Iterator[bool]:
    """Inside: Triton launches compile (in parallel) instead of running. Yields whether it is active."""
    if not supported():
        yield False
        return
    from triton.runtime._async_compile import AsyncCompileMode
    from triton.runtime.jit import KernelInterface

    workers = workers or min(16, os.cpu_count() or 4)
    original = KernelInterface.__getitem__

    def compile_only(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    global _dry_run
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="pagedserve-compile") as pool:
        mode = AsyncCompileMode(pool)
        mode.__enter__()
        KernelInterface.__getitem__ = compile_only
        _dry_run = True
        try:
            yield True
        finally:
            _dry_run = False
            KernelInterface.__getitem__ = original
            submitted = len(mode.raw_futures)
            mode.__exit__(None, None, None)  # waits for every compile, installs the kernels
    logger.info("start-up: %s: %d Triton variants compiled ahead in %.1f s (%d threads)", name, submitted,
                time.perf_counter() - t0, workers)


__all__ = ["compile_ahead", "dry_run", "supported"]
