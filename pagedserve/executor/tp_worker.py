"""Ranks 1..N-1 of tensor parallelism: each a process holding one shard of the model and its part of the KV
cache, running every step rank 0 broadcasts (pagedserve/distributed.py has the picture).

Rank 0 (the engine's Worker) starts them with `start_tp_workers` as plain subprocesses (`python -m
pagedserve.executor.tp_worker`, the arguments pickled on stdin), so an engine that itself runs in a daemonic
process can have them. A rank builds exactly what rank 0 builds, in the same order, because every
collective must be entered by all ranks: the weights (its slices), the KV-cache size (the memory profile's
forward on CUDA has the layers' all-reduces; then the smallest block count of all ranks), then the steps.
A step runs the model forward only; sampling happens on rank 0. `None` ends the loop.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from typing import Any

import torch

logger = logging.getLogger(__name__)


def start_tp_workers(config: Any, model_path: str, port: int) -> list[subprocess.Popen]:
    procs = []
    for rank in range(1, config.tensor_parallel_size):
        args = dict(config=config, model_path=model_path, rank=rank, port=port, parent_pid=os.getpid(),
                    log_level=logging.getLogger().getEffectiveLevel())
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.executor.tp_worker"], stdin=subprocess.PIPE)
        proc.stdin.write(pickle.dumps(args))
        proc.stdin.close()
        procs.append(proc)
    return procs


def stop_tp_workers(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("tensor-parallel rank (pid %d) did not stop in %.0f s: killed", proc.pid, timeout)
            proc.kill()
            proc.wait()


def cpu_threads(config: Any) -> int:
    """One CPU rank's share of the cores: every rank of every data-parallel replica gets as many."""
    ranks = config.tensor_parallel_size * getattr(config, "data_parallel_size", 1)
    return max(1, (os.cpu_count() or 1) // ranks)


def tp_device(config: Any, rank: int) -> torch.device:
    """Rank r runs on cuda:r when rank 0 runs on CUDA, else on the CPU with its share of the cores (no thread
    oversubscription between the ranks)."""
    from pagedserve.executor.worker import resolve_device

    device = resolve_device(config)
    if device.type == "cuda":
        if torch.cuda.device_count() < config.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} needs as many GPUs; "
                             f"torch sees {torch.cuda.device_count()}")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    torch.set_num_threads(cpu_threads(config))
    return device


def kill_tp_workers(procs: list[subprocess.Popen]) -> None:
    """Ends the ranks at once (rank 0 failed, or a rank is gone and the others wait in a collective)."""
    for proc in procs:
        proc.kill()
        proc.wait()


def _run_call(call: Any, runner: Any, sleep_state: Any) -> None:
    """A rank's side of a RankCall. Errors are logged, not raised: rank 0 meets the same ones and reports them
    (a rank that stopped here would leave the others waiting in the next collective)."""
    try:
        if call.method == "sleep":
            sleep_state.sleep(call.kwargs["level"])
        elif call.method == "wake_up":
            sleep_state.wake_up(call.kwargs["tags"])
        elif call.method == "load_weights":
            from pagedserve.executor.loader import iterate_safetensors

            path = call.kwargs.get("path")
            pairs = iterate_safetensors(path, runner.device) if path is not None else call.kwargs["pairs"]
            with torch.no_grad():
                runner.model.load_weights(pairs)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
        else:
            raise ValueError(f"unknown rank call {call.method!r}")
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.warning("%s on this rank failed: %s", call.method, e)


def run_rank(config: Any, model_path: str, rank: int, port: int) -> None:
    from pagedserve.distributed import RankCall, broadcast_object, destroy_tensor_parallel, init_tensor_parallel
    from pagedserve.executor.loader import load_model
    from pagedserve.executor.model_runner import ModelRunner
    from pagedserve.executor.sleep import RunnerSleep
    from pagedserve.executor.worker import (
        add_cpu_kv_tier,
        default_max_batched_tokens,
        hybrid_layout,
        make_lora_manager,
        resolve_dtype,
        size_kv_cache,
    )

    device = tp_device(config, rank)
    dtype = resolve_dtype(config, device)
    init_tensor_parallel(rank, config.tensor_parallel_size, port, device)
    try:
        torch.manual_seed(config.seed)
        model, hf_config = load_model(config, model_path, device, dtype)
        max_batched = default_max_batched_tokens(config, device)
        lora_manager = make_lora_manager(config, model, max_batched)
        num_blocks = size_kv_cache(config, model, hf_config, device, dtype, max_batched)
        layout = hybrid_layout(config, model, num_blocks)
        num_blocks = layout.num_blocks if layout is not None else num_blocks
        runner = ModelRunner(config, model, hf_config, device, dtype, num_blocks, config.block_size, sampler=None,
                             layout=layout)
        runner.lora_manager = lora_manager
        if config.kv_offloading_size:
            add_cpu_kv_tier(config, runner, hf_config)
        logger.info("tensor-parallel rank %d ready on %s: %d KV blocks", rank, device, num_blocks)
        sleep_state = RunnerSleep(runner)
        while (step := broadcast_object()) is not None:
            if isinstance(step, RankCall):
                _run_call(step, runner, sleep_state)
                continue
            for slot, lora_request in step.lora_loads:  # the adapters rank 0 put into slots for this step
                lora_manager.load_into(slot, lora_request)
            runner.forward_only(step)
    finally:
        destroy_tensor_parallel()


def main() -> None:
    # Ctrl-C and a process group's SIGTERM reach every rank: rank 0 decides when the ranks stop (None, or its exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=args["log_level"], format=f"%(asctime)s %(levelname)s [tp rank {args['rank']}] "
                        "%(name)s: %(message)s")  # fmt: skip
    from pagedserve.engine_process import exit_if_orphaned

    # Rank 0's process gone (even before this rank got here): this rank serves nobody
    exit_if_orphaned(f"tensor-parallel rank {args['rank']}", args["parent_pid"])
    run_rank(args["config"], args["model_path"], args["rank"], args["port"])


if __name__ == "__main__":
    main()
