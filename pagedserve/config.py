"""One engine configuration, built from CLI flags or keyword arguments, validated once, frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICES = ("auto", "cpu", "cuda")
QUANTIZATION_METHODS = ("fp8",)  # executor/quantization.py
_BACKENDS = ("auto", "torch", "triton")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 = fp8_e4m3 (vLLM's names); executor/kernels/kv_store.py


SCHEDULING_POLICIES = ("fcfs", "priority")
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def normalize_dtype_name(dtype: object) -> object:
    """vLLM's dtype spellings ("half", "float", a torch.dtype) as EngineConfig's names; others unchanged."""
    if isinstance(dtype, str):
        return _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    name = str(dtype)
    if name.startswith("torch."):
        return name.removeprefix("torch.")
    return dtype


def _is(*values: object):
    return lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values)


def _any(v: object) -> bool:
    return True


# vLLM's engine arguments that LLM(...) takes as vLLM does: name -> (accepts the value, why another is refused).
# Accepted values ask for what pagedserve does anyway (the CLI's "flags accepted for compatibility" likewise).
VLLM_ACCEPTED = {
    "trust_remote_code": (_any, ""),  # pagedserve never runs a checkpoint's Python: models load the same either way
    "swap_space": (_any, ""),  # a preempted request frees its blocks and is recomputed
    "enable_chunked_prefill": (_is(True, None), "long prompts are always chunked"),
    "pipeline_parallel_size": (_is(1, None), "pipeline parallelism is not supported; use tensor_parallel_size"),
    "distributed_executor_backend": (_is(None, "mp", "uni"), "the tensor-parallel ranks are local processes (mp)"),
    "disable_custom_all_reduce": (_any, ""),  # torch.distributed's all-reduce only
    "max_seq_len_to_capture": (_any, ""),  # the decode graphs serve every length up to max_model_len
    "disable_log_requests": (_any, ""),  # request contents are never logged
    "enable_log_requests": (_is(False, None), "request contents are never logged"),
    "disable_async_output_proc": (_any, ""),
    "compilation_config": (_any, ""),  # no torch.compile: the kernels are Triton's and the graphs pagedserve's own
    "tokenizer_mode": (_is("auto", "hf", None), "the model's Hugging Face tokenizer is used (fast where it has one)"),
    "tokenizer_revision": (_is(None), "the tokenizer comes from the model's revision (revision=)"),
    "code_revision": (_any, ""),  # no checkpoint code is run
    "task": (_is("auto", "generate", "embed", "classify", "score", None),
             "this engine generates, embeds and classifies (LLM.generate / embed / classify / score)"),
    "runner": (_is("auto", "generate", "pooling", None), "this engine generates and pools (LLM.embed, LLM.classify)"),
    "model_impl": (_is("auto", None), "pagedserve runs its own model code"),
    "cpu_offload_gb": (_is(0, 0.0, None), "weights are not offloaded to the CPU"),
    "skip_tokenizer_init": (_is(False, None), "the tokenizer is always loaded"),
    "enable_prompt_embeds": (_is(False, None), "prompts are text or token ids"),
    "logprobs_mode": (_is("raw_logprobs", None), "logprobs are of the model's raw distribution (raw_logprobs)"),
    "kv_transfer_config": (_is(None), "KV transfer between instances is not supported"),
    "calculate_kv_scales": (_is(False, None), "fp8 KV scales come from the checkpoint or are 1.0"),
    "max_cpu_loras": (_any, ""),  # adapters are read from disk when first named
    "limit_mm_per_prompt": (lambda v: not v or (isinstance(v, dict) and not any(v.values())),
                            "this engine serves text-only models"),  # ({"image": 0}: vLLM's way to turn images off)
    "mm_processor_kwargs": (lambda v: not v, "this engine serves text-only models"),
    "allowed_local_media_path": (lambda v: not v, "this engine serves text-only models"),
    "enable_expert_parallel": (_is(False, None), "MoE experts are split by tensor parallelism"),
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default model (see pagedserve.default_model)
    tokenizer: str | None = None  # defaults to the model's folder
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 (worker.resolve_dtype)
    device: str = "auto"
    load_format: str = "auto"
    quantization: str | None = None  # "fp8": decoder projections in float8_e4m3fn at load (executor/quantization.py)
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; "fp8" / "fp8_e4m3": K/V stored in float8_e4m3fn
    seed: int = 0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 2048 on CPU
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0  # KV cache size on CPU
    # overrides the memory profile (tests, experiments): the memory of that many blocks of every layer (a hybrid model's
    # groups make it more blocks of fewer layers: core/kv_cache.py)
    num_kv_blocks: int | None = None
    enforce_eager: bool = False  # no CUDA graphs
    skip_warmup: bool = False  # CUDA: no throwaway requests at start-up (the first real ones compile kernels)
    # Schedule step N+1 while step N runs on the device. None: on for CUDA, off on CPU (no overlap there).
    async_scheduling: bool | None = None
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere
    tensor_parallel_size: int = 1
    # Whole replicas of the engine behind one server (vLLM's --data-parallel-size; pagedserve/data_parallel.py), each
    # on its own tensor_parallel_size GPUs (on the CPU: its share of the cores). The server only: an LLMEngine is
    # one replica, and takes the value to know its share of the CPU's cores.
    data_parallel_size: int = 1
    chat_template: str | None = None  # a file path or the template text itself
    # Default sampling from the model's generation_config.json: "auto", "vllm" (none) or a folder;
    # override: a dict on top (pagedserve/generation_defaults.py).
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    max_queued_requests: int | None = None  # server: waiting requests beyond this get 503
    disable_log_stats: bool = False
    # LoRA adapters (pagedserve/lora.py, executor/lora.py): up to max_loras resident at once, of rank <= max_lora_rank
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # Speculative decoding (pagedserve/spec_decode.py): vLLM's --speculative-config, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}; a JSON string or a dict, kept as
    # the validated dict. None: off.
    speculative_config: dict | str | None = None
    # "fcfs": requests in arrival order; "priority": by each request's priority (lower first), then arrival, and a
    # step short of KV blocks preempts the lowest-priority running request (core/scheduler.py), as vLLM's
    # --scheduling-policy.
    scheduling_policy: str = "fcfs"
    # Chunked prefill: at most this many of one request's tokens a step (vLLM's --long-prefill-token-threshold), so
    # one long prompt does not take a step's whole budget from the others. None: the step's budget.
    long_prefill_token_threshold: int | None = None
    # Fields of the model's config.json set on top at load, as vLLM's --hf-overrides (e.g. {"rope_scaling": {...}}
    # for YaRN, {"max_position_embeddings": N}); executor/loader.apply_hf_overrides.
    hf_overrides: dict | None = None
    # Hub downloads: the branch, tag or commit of the model (and its tokenizer files), and where they are cached
    # (default: the Hugging Face cache).
    revision: str | None = None
    download_dir: str | None = None
    # vLLM's --hf-token: the Hub token for gated or private models (True: the one `hf auth login` stored; None: the
    # HF_TOKEN environment variable or that stored one, as huggingface_hub does). Never printed.
    hf_token: str | bool | None = dataclasses.field(default=None, repr=False)
    # The most logprobs (or prompt_logprobs) a request may ask for, as vLLM's --max-logprobs (at most 20 here).
    max_logprobs: int = 20
    # vLLM's --disable-sliding-window: every layer attends to all keys, the context capped at the model's window
    # (so nothing past the window is ever attended to differently from how the model was trained).
    disable_sliding_window: bool = False
    # vLLM's --disable-hybrid-kv-cache-manager: a model with windowed and full-attention layers (Gemma 2 / 3, gpt-oss,
    # Qwen2 with max_window_layers) keeps the whole context on its windowed layers too, in one pool; by default their
    # K/V live in a pool of their own that holds each request's window only (core/kv_cache.py). Off with KV offloading.
    disable_hybrid_kv_cache_manager: bool = False
    # KV offloading (vLLM's --kv-offloading-size): GiB of CPU memory for prefix-cache blocks evicted from the device
    # cache; a later prompt with that prefix copies them back instead of recomputing them (core/kv_cache.py's CpuTier).
    kv_offloading_size: float | None = None
    # vLLM's --enable-sleep-mode: the server's /sleep, /wake_up and /is_sleeping routes (the offline API's
    # LLM.sleep() / wake_up() need no flag: sleeping costs nothing until asked for; executor/sleep.py).
    enable_sleep_mode: bool = False

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if self.dtype not in _DTYPES:
            fail(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            fail(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            fail(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            fail(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.device not in _DEVICES:
            fail(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.attention_backend not in _BACKENDS:
            fail(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            fail(f"block_size must be a power of two from 1 to 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            fail(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            fail(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and not 1 <= self.max_model_len <= 2**31 - 1:
            fail(f"max_model_len must be in [1, 2**31 - 1], got {self.max_model_len}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            fail(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            fail(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            fail(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.tensor_parallel_size < 1:
            fail(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if isinstance(self.data_parallel_size, bool) or not isinstance(self.data_parallel_size, int) \
                or self.data_parallel_size < 1:
            fail(f"data_parallel_size must be an integer >= 1, got {self.data_parallel_size!r}")
        if not self.generation_config:
            fail("generation_config must be auto, vllm or a folder")
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            fail(f"override_generation_config must be a dict, got {self.override_generation_config!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            fail(f"max_loras and max_lora_rank must be >= 1, got {self.max_loras} and {self.max_lora_rank}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            fail(f"long_prefill_token_threshold must be >= 1, got {self.long_prefill_token_threshold}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            fail(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            fail(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.kv_offloading_size is not None:
            if self.kv_offloading_size <= 0:
                fail(f"kv_offloading_size must be > 0 GiB, got {self.kv_offloading_size}")
            if not self.enable_prefix_caching:
                fail("kv_offloading_size keeps evicted prefix-cache blocks: it needs enable_prefix_caching")
        if self.hf_token is not None and not (isinstance(self.hf_token, bool)
                                              or (isinstance(self.hf_token, str) and self.hf_token)):
            fail("hf_token must be a non-empty string, True or None")
        if self.hf_overrides is not None and not isinstance(self.hf_overrides, dict):
            fail(f"hf_overrides must be a dict of config.json fields, got {self.hf_overrides!r}")
        from pagedserve.sampling_params import MAX_LOGPROBS

        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) \
                or not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            fail(f"max_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.max_logprobs!r}")
        if self.speculative_config is not None:
            from pagedserve.spec_decode import SpeculativeConfig

            spec = SpeculativeConfig.parse(self.speculative_config)
            object.__setattr__(self, "speculative_config", spec.as_dict())  # frozen: set once, validated

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """From keyword arguments (LLM(...)'s): EngineConfig's fields, vLLM's dtype aliases ("half", "float",
        torch dtypes), and vLLM's engine arguments that ask for what pagedserve does anyway (VLLM_ACCEPTED); a
        ValueError for unknown names and for such arguments asking for something else."""
        names = {f.name for f in dataclasses.fields(cls)}
        for name in sorted(set(kwargs) & set(VLLM_ACCEPTED)):
            value = kwargs.pop(name)
            accepted, why = VLLM_ACCEPTED[name]
            if not accepted(value):
                raise ValueError(f"{name}={value!r} is not supported: {why}")
        if "dtype" in kwargs:
            kwargs["dtype"] = normalize_dtype_name(kwargs["dtype"])
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine arguments: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
