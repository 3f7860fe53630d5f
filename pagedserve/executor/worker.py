"""The worker: resolves the config against the machine and the model, loads tokenizer and weights,
sizes the KV cache, and runs steps. The engine talks to the executor only through this object."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.config import QUANTIZATION_METHODS, EngineConfig
from pagedserve.core.outputs import RunnerOutput, SchedulerOutput
from pagedserve.spec_decode import SpeculativeConfig

if TYPE_CHECKING:
    from pagedserve.executor.model_runner import KVLayout

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """dtype "auto": bfloat16 on CUDA; on a CPU, bfloat16 where it has native bf16 dot products (AVX512-BF16 or
    AMX: 2.8x faster than float32 for the embedded model on this project's CI machine, docs/benchmarks.md), else
    float32 (emulated bf16 is slower than float32 there). PAGEDSERVE_CPU_DTYPE=float32|bfloat16 sets the CPU's
    choice (the tests pin float32: Transformers' fp32 numerics are their reference)."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda":
        return torch.bfloat16
    forced = os.environ.get("PAGEDSERVE_CPU_DTYPE", "").strip()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"PAGEDSERVE_CPU_DTYPE must be float32 or bfloat16, got {forced!r}")
        return _DTYPES[forced]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX tiles, as torch's CPU kernels use)."""
    import torch.cpu

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes, or a CPU it cannot ask
        return False


def default_max_batched_tokens(config: EngineConfig, device: torch.device) -> int:
    return config.max_num_batched_tokens or (8192 if device.type == "cuda" else 2048)


def resolve_model(config: EngineConfig) -> tuple[str, str, str | None]:
    """Returns (model path for the loader, tokenizer folder, gguf file or None); downloads Hub ids."""
    from pagedserve.executor.loader import fetch_model_source

    if config.model is None:
        from pagedserve.default_model import ensure_default_model

        path = ensure_default_model()
        return path, path, None
    source = fetch_model_source(config.model, config.load_format, config.revision, config.download_dir,
                                config.hf_token)
    return source.path, source.folder, source.path if source.kind == "gguf" else None


@dataclass(slots=True)
class Worker:
    config: EngineConfig
    tokenizer: object
    runner: object
    max_model_len: int
    vocab_size: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    hf_config: object
    device: torch.device
    dtype: torch.dtype
    # Sampling fields a request leaves unset take these (the model's generation_config.json; see
    # pagedserve/generation_defaults.py).
    default_sampling: dict = field(default_factory=dict)
    tp_procs: list = field(default_factory=list)  # ranks 1..N-1 of tensor parallelism (executor/tp_worker.py)
    # speculative decoding with a draft model (executor/draft_model.py): the scheduler's proposer; None otherwise
    draft_proposer: object = None
    num_cpu_kv_blocks: int = 0  # KV offloading's CPU tier (config.kv_offloading_size)
    # the model's window when every layer is windowed (its blocks behind the window are given back), else None
    sliding_window: int | None = None
    # a hybrid model (windowed and full-attention layers; core/kv_cache.py): the window and the window groups, else
    # None / 0
    hybrid_window: int | None = None
    num_window_groups: int = 0
    _sleep: list | None = None  # sleep mode: the runners' RunnerSleep states, made on first use
    _weight_groups: dict = field(default_factory=dict)  # trainer process groups by name (executor/weight_sync.py)

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self._send_to_ranks(scheduler_output)
        return self.runner.execute(scheduler_output)

    def execute_async(self, scheduler_output: SchedulerOutput, before_sample: Callable[[], None] | None = None):
        """Queues the step; the returned handle's result() waits for it (see ModelRunner)."""
        self._send_to_ranks(scheduler_output)
        return self.runner.execute_async(scheduler_output, before_sample)

    def _send_to_ranks(self, scheduler_output: SchedulerOutput) -> None:
        if self.tp_procs and not scheduler_output.is_empty:  # the other ranks run the same step's forward
            from pagedserve.distributed import broadcast_object

            self._check_ranks()
            layout = getattr(self.runner, "layout", None)
            message = _for_other_ranks(scheduler_output, getattr(layout, "window", None), self.config.block_size)
            lora_manager = getattr(self.runner, "lora_manager", None)
            if lora_manager is not None:
                message.lora_loads = lora_manager.take_loads()
            broadcast_object(message)

    def _check_ranks(self) -> None:
        for rank, proc in enumerate(self.tp_procs, start=1):  # a dead rank: fail now, not in a collective
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code "
                                   f"{proc.returncode}; the engine cannot go on without it")

    def load_weights(self, weights: Any) -> int:
        """New values for some or all of the model's weights, named as in its checkpoint (Transformers' names),
        copied in place (CUDA graphs keep their pointers): `weights` is a folder of safetensors, a dict, or
        (name, tensor) pairs, in any dtype and on any device. With tensor parallelism every rank takes its slices
        (a folder is read by each rank; tensors go to the ranks in chunks through the process group). Returns how
        many tensors were applied. ValueError for a model whose weights were transformed at load (fp8 / 4-bit
        projections, KV scales folded in for an fp8 cache), while the weights sleep, or for names the model lacks
        or shapes it does not have."""
        model = self.runner.model
        self._check_updatable("load_weights")
        if self._sleep_states()[0].weights is not None:
            raise ValueError("load_weights: the weights are asleep; wake_up(tags=['weights']) first")
        path = None
        if isinstance(weights, (str, os.PathLike)):
            from pagedserve.executor.loader import iterate_safetensors

            path = os.fspath(weights)
            if not os.path.isdir(path):
                raise ValueError(f"load_weights: {path!r} is not a folder of safetensors files")
            _check_safetensors_folder(path)  # (an unreadable file refused before anything is copied)
            self._rank_call("load_weights", path=path)
            weights = iterate_safetensors(path, self.device)
        elif isinstance(weights, dict):
            weights = weights.items()
        count = [0]

        def counted():
            for name, tensor in weights:
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"load_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
                if not tensor.is_floating_point():  # (an int or bool tensor would be cast without a word)
                    raise ValueError(f"load_weights: {name!r} is a {tensor.dtype} tensor; weights are floating point")
                count[0] += 1
                yield name, tensor

        skipped: list[str] = []
        with torch.no_grad():
            if self.tp_procs and path is None:  # the ranks take each chunk as rank 0 does
                for chunk in _chunks(counted(), _TP_CHUNK_BYTES):
                    self._rank_call("load_weights", pairs=[(n, t.detach().cpu()) for n, t in chunk])
                    model.load_weights(chunk)
                    skipped += model.skipped_weights
            else:
                model.load_weights(counted())
                skipped = model.skipped_weights
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if skipped:
            shown = ", ".join(repr(n) for n in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                                               else "")
            raise ValueError(f"load_weights: the model has no weight named {shown}; the other "
                             f"{count[0] - len(skipped)} tensors were applied")
        return count[0]

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None) -> None:
        """Joins a trainer's process group as rank `rank_offset` (executor/weight_sync.py): blocks until all
        `world_size` ranks came. backend: nccl on CUDA, gloo on CPU by default."""
        from pagedserve.executor.weight_sync import join_group

        if (not isinstance(master_address, str) or not master_address or not master_address.isascii()
                or not master_address.isprintable()):
            raise ValueError(f"master_address must be a host name or address, got {master_address!r}")
        for name, value, low in (("master_port", master_port, 1), ("world_size", world_size, 2),
                                 ("rank_offset", rank_offset, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if master_port > 65535 or rank_offset >= world_size:
            raise ValueError(f"master_port must be at most 65535 and rank_offset below world_size (rank 0 is the "
                             f"trainer's), got {master_port} and {rank_offset} of {world_size}")
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"group_name must be a non-empty string, got {group_name!r}")
        if group_name in self._weight_groups:
            raise ValueError(f"a weight-update group named {group_name!r} is already joined")
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo") or (backend == "nccl" and self.device.type != "cuda"):
            raise ValueError(f"backend must be nccl (CUDA) or gloo, got {backend!r} on {self.device.type}")
        self._check_updatable("init_weights_update_group")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            self._weight_groups[group_name] = join_group(master_address, master_port, rank_offset, world_size,
                                                         group_name, backend)
        except Exception as e:  # noqa: BLE001 - the rendezvous timed out, the address did not resolve, ...
            raise ValueError(f"init_weights_update_group: could not join {group_name!r} at "
                             f"{master_address}:{master_port}: {e}") from None
        logger.info("joined weight-update group %r as rank %d of %d (%s)", group_name, rank_offset, world_size,
                    backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group") -> int:
        """Receives the announced tensors as the trainer (rank 0 of the group) broadcasts them, in that order, and
        copies each into the model (load_weights); returns how many. ValueError for bad announcements (nothing
        received then), an unknown group, or names / shapes the model lacks (the rest is still received)."""
        from pagedserve.executor.weight_sync import BroadcastStream, parse_update

        tensors = parse_update(names, dtypes, shapes)
        if not isinstance(group_name, str):
            raise ValueError(f"group_name must be a string, got {group_name!r}")
        group = self._weight_groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight-update group named {group_name!r}; call init_weights_update_group first")
        stream = BroadcastStream(group, tensors, self.device)
        try:
            return self.load_weights(stream)
        finally:
            left = stream.drain()
            if left:
                logger.warning("update_weights_from_distributed failed; %d tensors received and dropped", left)

    def _check_updatable(self, what: str) -> None:
        model = self.runner.model
        if getattr(model, "quantization", None) is not None:
            raise ValueError(f"{what}: this model holds its projections as {model.quantization} (quantized at "
                             "load); weight updates need a model served in its own dtype")
        if self.config.kv_cache_dtype != "auto":
            raise ValueError(f"{what}: with an fp8 KV cache the checkpoint's KV scales are folded into the "
                             "weights at load; weight updates need kv_cache_dtype auto")

    # ------------------------------------------------------------------ sleep mode (executor/sleep.py)
    def _sleep_states(self) -> list:
        """The target runner's sleep state, then the draft model's (if any)."""
        states = self._sleep
        if states is None:
            from pagedserve.executor.sleep import RunnerSleep

            runners = [self.runner]
            if self.draft_proposer is not None and getattr(self.draft_proposer, "runner", None) is not None:
                runners.append(self.draft_proposer.runner)
            states = self._sleep = [RunnerSleep(r) for r in runners]
        return states

    def sleep(self, level: int = 1) -> int:
        """Gives the device memory of the weights and the KV cache back (level 1: the weights kept in host memory;
        level 2: discarded, new ones come through load_weights after wake_up). Returns the bytes freed (rank 0's).
        A draft model's weights are always kept (level 1): load_weights updates the target only."""
        if level not in (1, 2):
            raise ValueError(f"sleep: level must be 1 (weights kept in host memory) or 2 (weights discarded), "
                             f"got {level!r}")
        if level == 2:
            self._check_updatable("sleep(level=2)")
        self._rank_call("sleep", level=level)
        states = self._sleep_states()
        return states[0].sleep(level) + sum(s.sleep(1) for s in states[1:])

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Takes the memory back: `tags` None for all, or a subset of ["weights", "kv_cache"] (weights first, to load
        new ones while the cache still sleeps)."""
        from pagedserve.executor.sleep import TAGS

        if tags is not None:
            if isinstance(tags, str) or not all(isinstance(t, str) and t in TAGS for t in tags):
                raise ValueError(f"wake_up: tags must be a list of {list(TAGS)}, got {tags!r}")
            tags = list(tags)
        self._rank_call("wake_up", tags=tags)
        for state in self._sleep_states():
            state.wake_up(tags)

    def is_sleeping(self) -> bool:
        return any(state.asleep for state in self._sleep_states())

    def _rank_call(self, method: str, **kwargs: Any) -> None:
        """Runs `method` on ranks 1..N-1 of tensor parallelism (executor/tp_worker.py's RankCall)."""
        if not self.tp_procs:
            return
        from pagedserve.distributed import RankCall, broadcast_object

        self._check_ranks()
        broadcast_object(RankCall(method, kwargs))

    def close(self) -> None:
        """Ends the tensor-parallel ranks and leaves the trainers' weight-update groups; the worker takes no steps
        after it."""
        groups, self._weight_groups = self._weight_groups, {}
        for group in groups.values():
            torch.distributed.destroy_process_group(group)
        if not self.tp_procs:
            return
        from pagedserve.distributed import broadcast_object, destroy_tensor_parallel
        from pagedserve.executor.tp_worker import kill_tp_workers, stop_tp_workers

        procs, self.tp_procs = self.tp_procs, []
        try:
            broadcast_object(None)
        except Exception as e:  # noqa: BLE001 - a rank already gone: end the others all the same
            logger.warning("tensor parallelism: could not tell the ranks to stop (%s); ending them", e)
            kill_tp_workers(procs)
        finally:
            stop_tp_workers(procs)
            destroy_tensor_parallel()


def _check_safetensors_folder(path: str) -> None:
    """ValueError unless the folder's weight files (loader.safetensors_files: at least one) have readable headers."""
    from safetensors import safe_open

    from pagedserve.executor.loader import safetensors_files

    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: a truncated or foreign file
            raise ValueError(f"load_weights: {file!r} is not a readable safetensors file ({e})") from None


_TP_CHUNK_BYTES = 256 * 2**20  # load_weights with tensor parallelism: tensors sent to the ranks in chunks of this


def _chunks(pairs, limit: int):
    """(name, tensor) pairs in lists of at most `limit` bytes (or one tensor)."""
    chunk, size = [], 0
    for name, tensor in pairs:
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _for_other_ranks(scheduler_output: SchedulerOutput, window: int | None = None,
                     block_size: int = 1) -> SchedulerOutput:
    """The step as ranks 1..N-1 need it: what to compute and where, without the prompt and output histories
    (rank 0's sampler reads those), which would make each step's message grow with every request's length.
    A request computing prompt logprobs keeps its prompt, and drafted ones their drafts: the ranks take the same
    LM-head rows as rank 0. A hybrid model's window tables (`window`: its window) travel from the window of the step's
    first token on (window_first), the entries before it never read."""
    from pagedserve.core.outputs import ScheduledRequest

    def slim(r: ScheduledRequest) -> ScheduledRequest:
        window_ids, first = r.window_block_ids, r.window_first
        if window_ids is not None and window is not None:
            first = max(first, max(0, r.num_computed_tokens - window + 1) // block_size)
            window_ids = [ids[first - r.window_first:] for ids in window_ids]
        return ScheduledRequest(r.request_id, r.token_ids, r.num_computed_tokens, r.block_ids, r.needs_sample,
                                r.sampling_params, r.prompt_token_ids if r.wants_prompt_logprobs else [], [],
                                r.output_index, lora_slot=r.lora_slot, draft_token_ids=r.draft_token_ids,
                                window_block_ids=window_ids, window_first=first)

    return SchedulerOutput(
        [slim(r) for r in scheduler_output.scheduled],
        scheduler_output.num_batched_tokens, scheduler_output.finished_request_ids,
        scheduler_output.preempted_request_ids, kv_copies_out=scheduler_output.kv_copies_out,
        kv_copies_in=scheduler_output.kv_copies_in)


def build_worker(config: EngineConfig, on_tokenizer_source: Callable[[str, str | None], None] | None = None
                 ) -> Worker:
    """`on_tokenizer_source(source, chat_template)` is called as soon as the tokenizer's source is
    known (seconds before the worker is built): the server loads its own copy meanwhile."""
    t0 = time.monotonic()
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    if device.type == "cuda":
        torch.empty(1, device=device)  # the CUDA context, here rather than inside the first real op
    elif config.data_parallel_size > 1 and config.tensor_parallel_size == 1:
        from pagedserve.executor.tp_worker import cpu_threads

        torch.set_num_threads(cpu_threads(config))  # a data-parallel replica: its share of the cores
    t_device = time.monotonic() - t0
    model_path, tokenizer_folder, gguf_file = resolve_model(config)
    if config.model is None:
        from pagedserve.default_model import DEFAULT_MODEL

        config = config.replace(model=model_path,
                                served_model_name=config.served_model_name or DEFAULT_MODEL.name)
    tp_procs = []
    if config.tensor_parallel_size > 1:
        # Every rank runs each step eagerly as rank 0 sends it (no CUDA graphs with collectives inside, yet).
        config = config.replace(enforce_eager=True)
        if device.type == "cuda":  # no dry (compile-only) passes: rank 0's would meet the ranks' real ones
            os.environ["PAGEDSERVE_PRECOMPILE"] = "0"
        tp_procs = _start_tensor_parallel(config, model_path, device)
    try:
        return _build_rank0(config, device, dtype, model_path, tokenizer_folder, gguf_file, t0, t_device,
                            on_tokenizer_source, tp_procs)
    except BaseException:
        if tp_procs:  # the other ranks wait in a collective that will not come: end them
            from pagedserve.distributed import destroy_tensor_parallel
            from pagedserve.executor.tp_worker import kill_tp_workers

            kill_tp_workers(tp_procs)
            destroy_tensor_parallel()
        raise


def _start_tensor_parallel(config: EngineConfig, model_path: str, device: torch.device) -> list:
    """Starts ranks 1..N-1 and joins the group as rank 0 (pagedserve/distributed.py)."""
    from pagedserve.distributed import free_port, init_tensor_parallel
    from pagedserve.executor.tp_worker import kill_tp_workers, start_tp_workers, tp_device

    tp_device(config, 0)  # checks the GPU count on CUDA; on CPU takes rank 0's share of the cores
    port = free_port()
    procs = start_tp_workers(config, model_path, port)
    try:
        init_tensor_parallel(0, config.tensor_parallel_size, port, device)
    except BaseException:
        kill_tp_workers(procs)
        raise
    logger.info("tensor parallelism: %d ranks (%s)", config.tensor_parallel_size,
                "NCCL" if device.type == "cuda" else "gloo")
    return procs


def _build_rank0(config: EngineConfig, device: torch.device, dtype: torch.dtype, model_path: str,
                 tokenizer_folder: str, gguf_file: str | None, t0: float, t_device: float,
                 on_tokenizer_source: Callable[[str, str | None], None] | None, tp_procs: list) -> Worker:
    from pagedserve.executor.loader import read_plain_config
    from pagedserve.tokenizer import load_tokenizer

    torch.manual_seed(config.seed)
    from pagedserve.generation_defaults import load_generation_defaults

    # Checked before the weights load, so a bad generation config fails fast.
    default_sampling = load_generation_defaults(tokenizer_folder, config.generation_config,
                                                config.override_generation_config)

    # The tokenizer loads in a thread while the weights load (both take seconds at start-up).
    # transformers' lazy attributes are not safe to resolve from two threads at once: when this thread
    # will also use transformers (AutoConfig), resolve them here first.
    if gguf_file is not None or read_plain_config(model_path) is None:
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    logger.info("start-up: device ready at %.1f s, model resolved and transformers imported at %.1f s",
                t_device, time.monotonic() - t0)
    tokenizer_source = config.tokenizer or gguf_file or tokenizer_folder
    pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")
    try:
        tokenizer_future = pool.submit(load_tokenizer, tokenizer_source, chat_template=config.chat_template)
        if on_tokenizer_source is not None:
            on_tokenizer_source(tokenizer_source, config.chat_template)
        worker = _build_on_device(config, model_path, tokenizer_folder, device, dtype, t0, tokenizer_future)
        worker.default_sampling = default_sampling
        if tp_procs:
            import atexit

            worker.tp_procs = tp_procs
            atexit.register(worker.close)  # an LLM user need not call close(): the ranks end with this process
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return worker


def make_lora_manager(config: EngineConfig, model, max_batched: int):
    """enable_lora: the adapter slots (executor/lora.py), made before the KV cache takes the rest of the memory."""
    if not config.enable_lora:
        return None
    from pagedserve.executor.lora import LoRAManager
    from pagedserve.executor.model_runner import padded_count

    # Any forward's tokens: padded eager steps, the memory profile, the graphs (decode: max_num_seqs at most).
    max_tokens = padded_count(max(max_batched, config.max_num_seqs)) + 256
    return LoRAManager(model, config.max_loras, config.max_lora_rank, max_tokens)


def size_kv_cache(config: EngineConfig, model, hf_config, device: torch.device, dtype: torch.dtype,
                  max_batched: int, extra_bytes_per_block: int = 0) -> int:
    """KV blocks for this rank's cache: what fits here, then the fewest of any rank (one block table serves
    every rank); ValueError when fewer than 2 fit. extra_bytes_per_block: another cache of as many blocks (a draft
    model's) shares the budget."""
    from pagedserve.distributed import min_across_ranks
    from pagedserve.executor.model_runner import determine_num_blocks

    num_blocks = min_across_ranks(determine_num_blocks(config, model, hf_config, device, dtype, max_batched,
                                                       extra_bytes_per_block=extra_bytes_per_block))
    if num_blocks < 2:
        raise ValueError(f"only {num_blocks} KV blocks fit; raise gpu_memory_utilization or cpu_kv_cache_gib")
    return num_blocks


def hybrid_layout(config: EngineConfig, model, num_blocks: int) -> KVLayout | None:
    """The KV cache's layout: for a model with windowed and full-attention layers (core/kv_cache.py, vLLM's hybrid
    allocator), the layers in groups of one size g (the full-attention layers one group, the windowed ones the
    others), g KV tensors shared by the groups, and the memory of `num_blocks` blocks of every layer as
    num_blocks * layers // g blocks of g; g is the size with the fewest layer slots in all (the last window group may
    have unused slots), the largest on a tie (fewer tables a step). None (one table, a tensor a layer) for other
    models, with --disable-hybrid-kv-cache-manager, with KV offloading, and where the groups would leave more than a
    tenth of their slots unused (e.g. fewer windowed layers than full-attention ones: each window group as large as
    the full one), which requests no longer than the window would pay for."""
    from pagedserve.executor.model_runner import KVLayout
    from pagedserve.executor.models.decoder import hybrid_window_layers

    hybrid = hybrid_window_layers(model)
    if hybrid is None or config.disable_hybrid_kv_cache_manager:
        return None
    if config.kv_offloading_size:
        logger.info("KV cache: one block table for every layer (the hybrid layout of windowed and full-attention "
                    "layers is off with KV offloading)")
        return None
    window, windowed = hybrid
    num_layers = len(model.model.layers)
    full = [i for i in range(num_layers) if i not in windowed]
    win = sorted(windowed)
    size = min(range(len(full), max(len(full), len(win)) + 1), key=lambda g: (g * (1 + -(-len(win) // g)), -g))
    group, slot = [0] * num_layers, [0] * num_layers
    for j, i in enumerate(full):
        slot[i] = j
    for j, i in enumerate(win):
        group[i], slot[i] = 1 + j // size, j % size
    num_window_groups = -(-len(win) // size)
    slots = size * (1 + num_window_groups)
    if slots > 1.1 * num_layers:
        logger.info("KV cache: one block table for every layer (window groups of %d layers would leave %d of %d "
                    "slots unused)", size, slots - num_layers, slots)
        return None
    return KVLayout(num_blocks * num_layers // size, window, num_window_groups, tuple(group), tuple(slot), size)


def _build_on_device(config: EngineConfig, model_path: str, tokenizer_folder: str, device: torch.device,
                     dtype: torch.dtype, t0: float, tokenizer_future) -> Worker:
    """Weights, KV sizing and graph capture, while the tokenizer loads in its thread: nothing here
    needs it but the sampler's EOS ids, which are set once it is ready (before any request)."""
    from pagedserve.core.scheduler import request_capacity_tokens, window_kv_tokens
    from pagedserve.executor.compile_log import install, summary_suffix
    from pagedserve.executor.layers import rope_max_positions
    from pagedserve.executor.loader import get_eos_token_ids, load_model
    from pagedserve.executor.model_runner import ModelRunner
    from pagedserve.executor.models.decoder import uniform_sliding_window
    from pagedserve.executor.sampler import Sampler

    install()  # PAGEDSERVE_LOG_COMPILES=1: Triton compile time per start-up phase in the log
    if device.type == "cuda" and os.environ.get("PAGEDSERVE_BLAS"):  # e.g. cublaslt (an A/B knob)
        torch.backends.cuda.preferred_blas_library(os.environ["PAGEDSERVE_BLAS"])
    model, hf_config = load_model(config, model_path, device, dtype)
    logger.info("start-up: weights in %.1f s", time.monotonic() - t0)
    held = getattr(model, "quantization", None)  # how the projections are held: fp8 (a flag or the checkpoint), int4
    if held != config.quantization and (held is None or held in QUANTIZATION_METHODS):  # an fp8 checkpoint, no flag
        config = dataclasses.replace(config, quantization=held)

    model_len = rope_max_positions(hf_config)
    if config.max_model_len is not None and model_len and config.max_model_len > model_len:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {model_len} tokens "
                         "(max_position_embeddings, or YaRN's original_max_position_embeddings x factor)")
    max_batched = default_max_batched_tokens(config, device)
    vocab_size = int(hf_config.vocab_size)
    lora_manager = make_lora_manager(config, model, max_batched)
    draft = _load_draft(config, device, dtype, hf_config, config.max_model_len or model_len)
    extra_bytes = 0
    if draft is not None:  # the draft's cache has as many blocks as the target's: one budget sizes both
        from pagedserve.distributed import single_rank
        from pagedserve.executor.model_runner import kv_cache_bytes_per_block, kv_cache_dtype_of

        with single_rank():  # (whole on rank 0: all its kv heads)
            extra_bytes = kv_cache_bytes_per_block(draft[2], config.block_size, kv_cache_dtype_of(config, dtype))
    uniform_blocks = size_kv_cache(config, model, hf_config, device, dtype, max_batched, extra_bytes)
    layout = hybrid_layout(config, model, uniform_blocks)
    num_blocks = layout.num_blocks if layout is not None else uniform_blocks
    capacity = num_blocks * config.block_size
    if layout is not None:  # (what one request can hold: its window groups take their share)
        capacity = request_capacity_tokens(num_blocks, config.block_size, layout.num_window_groups,
                                           window_kv_tokens(layout.window, max_batched, config.block_size))
    max_model_len = config.max_model_len or model_len
    window = uniform_sliding_window(model)
    needed = max_model_len  # every layer windowed: a request holds its window's blocks only (core/scheduler.py)
    if window is not None:
        needed = min(max_model_len, window_kv_tokens(window, max_batched, config.block_size))
    if config.max_model_len is None and capacity < needed:
        # One request must always fit the whole cache, or it could preempt itself forever.
        logger.warning("the KV cache holds %d tokens, less than the model's %d: max_model_len set to %d",
                       capacity, max_model_len, capacity)
        max_model_len = capacity
    config_eos_ids = get_eos_token_ids(hf_config, tokenizer_folder)
    # The fused Triton sampling kernel for random rows on CUDA (4.5-5x faster than the torch ops at 139-256
    # rows), with top-k / top-p / min-p as a per-row threshold found without a sort; PAGEDSERVE_FUSED_SAMPLER=0
    # sends every row through the torch ops instead, PAGEDSERVE_FUSED_FILTERS=0 only the filtered ones.
    sampler = Sampler(vocab_size, config_eos_ids,
                      use_fused_kernel=os.environ.get("PAGEDSERVE_FUSED_SAMPLER", "1") != "0",
                      fused_filters=os.environ.get("PAGEDSERVE_FUSED_FILTERS", "1") != "0",
                      fused_penalties=os.environ.get("PAGEDSERVE_FUSED_PENALTIES", "1") != "0",
                      max_rows=config.max_num_seqs)
    runner = ModelRunner(config, model, hf_config, device, dtype, num_blocks, config.block_size, sampler,
                         layout=layout)
    runner.lora_manager = lora_manager
    config = dataclasses.replace(config, max_model_len=max_model_len, max_num_batched_tokens=max_batched)
    logger.info("start-up: KV cache sized at %.1f s%s", time.monotonic() - t0, summary_suffix())
    if device.type == "cuda" and not config.enforce_eager:
        runner.capture_cuda_graphs(config.max_num_seqs, max_model_len, config.max_num_batched_tokens)
    proposer = None
    if draft is not None:
        from pagedserve.executor.draft_model import DraftModelProposer

        draft_config, draft_model, draft_hf = draft
        draft_config = dataclasses.replace(draft_config, max_model_len=max_model_len,
                                           max_num_batched_tokens=max_batched)
        with single_rank():  # the draft is rank 0's alone
            draft_runner = ModelRunner(draft_config, draft_model, draft_hf, device, dtype, uniform_blocks,
                                       config.block_size,
                                       Sampler(int(draft_hf.vocab_size), set(), max_rows=config.max_num_seqs))
            if device.type == "cuda" and not config.enforce_eager:
                draft_runner.capture_cuda_graphs(config.max_num_seqs, max_model_len, max_batched)
        proposer = DraftModelProposer(SpeculativeConfig.parse(config.speculative_config), draft_runner, uniform_blocks,
                                      config.block_size, max_batched)
    tokenizer = tokenizer_future.result()
    sampler.eos_token_ids |= set(tokenizer.eos_token_ids)
    logger.info("model %s loaded on %s (%s) in %.1f s (tokenizer ready); KV cache: %d blocks x %d tokens (%s)",
                model_path, device, str(dtype).removeprefix("torch."), time.monotonic() - t0, num_blocks,
                config.block_size, str(runner.kv_dtype).removeprefix("torch."))
    if layout is not None:
        logger.info("hybrid KV cache: layers in groups of %d (full attention 1, window %d: %d), %d blocks of a group "
                    "(%d blocks of every layer without groups); one request holds up to %d tokens", layout.group_size,
                    layout.window, layout.num_window_groups, num_blocks, uniform_blocks, capacity)
    worker = Worker(config, tokenizer, runner, max_model_len, vocab_size, max_batched, num_blocks, hf_config,
                    device, dtype)
    worker.draft_proposer = proposer
    worker.sliding_window = window
    if layout is not None:
        worker.hybrid_window, worker.num_window_groups = layout.window, layout.num_window_groups
    if config.kv_offloading_size:
        worker.num_cpu_kv_blocks = add_cpu_kv_tier(config, runner, hf_config)
        logger.info("KV offloading: %d CPU blocks (%.2f GiB) behind the %d device blocks", worker.num_cpu_kv_blocks,
                    config.kv_offloading_size, num_blocks)
    return worker


def add_cpu_kv_tier(config: EngineConfig, runner, hf_config) -> int:
    """KV offloading: the runner's CPU tier, kv_offloading_size GiB of this rank's blocks (every rank holds its heads'
    slice of each block, so every rank gets the same count); returns the block count."""
    from pagedserve.executor.model_runner import kv_cache_bytes_per_block

    per_block = kv_cache_bytes_per_block(hf_config, config.block_size, runner.kv_dtype)
    num_blocks = max(1, int(config.kv_offloading_size * 2**30) // per_block)
    runner.allocate_cpu_kv_tier(num_blocks)
    return num_blocks


def _load_draft(config: EngineConfig, device: torch.device, dtype: torch.dtype, hf_config, max_model_len: int):
    """(draft EngineConfig, model, HF config) for speculative decoding with a draft model, else None. Loaded before
    the KV cache is sized, so the memory profile counts its weights."""
    spec = SpeculativeConfig.parse(config.speculative_config)
    if spec is None or spec.method != "draft_model":
        return None
    from pagedserve.executor.draft_model import load_draft

    return load_draft(config, spec, device, dtype, hf_config, max_model_len)
