"""Engine flags shared by every CLI command, named as vLLM names them, mapped onto EngineConfig."""

from __future__ import annotations

import argparse

from pagedserve.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS, EngineConfig, normalize_dtype_name


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    help_model = ("model: a Hugging Face folder, a .gguf file, or a Hub id; "
                  "default: the embedded Qwen2.5-Coder-0.5B-Instruct")
    if model_positional:
        parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=help_model)
    parser.add_argument("--model", default=None, help=help_model)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="vLLM's: a YAML file of flags (`max-model-len: 4096`, `enable-prefix-caching: false`, "
                             "lists and mappings as such); flags on the command line win")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                   help="weight and activation dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 "
                   "(AVX512-BF16, AMX), else float32")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="weights source; dummy: random weights from config.json (benchmarks of shapes)")
    g.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="fp8: the decoder's projections in float8_e4m3fn with a scale per output row, quantized at "
                        "load (half the weight memory and decode bytes; fp8 tensor cores for prefill on compute "
                        "capability >= 8.9; the CPU keeps the dequantized values)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="auto: the model's dtype; fp8 (= fp8_e4m3): K and V stored in float8_e4m3fn, half the KV "
                        "memory (the checkpoint's KV-cache scales when it has them, else scale 1: values clamped to "
                        "+-448)")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling and dummy weights")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output); default: the model's max_position_embeddings")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step (prefill chunks + decodes); default 8192 on CUDA, 2048 on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV cache")
    g.add_argument("--cpu-kv-cache-gib", type=float, default=2.0, help="KV cache size when running on CPU")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the number of KV blocks (overrides sizing)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV blocks of identical prompt prefixes across requests")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--skip-warmup", action="store_true",
                   help="GPU: skip the start-up pass that compiles every kernel variant (faster start-up; "
                        "the first requests then wait for compiles)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the device runs the current one, hiding host work "
                        "(default: on for CUDA, off on CPU)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs: requests in arrival order; priority: by each request's `priority` (lower first), "
                   "then arrival; a step short of KV blocks preempts the lowest-priority running request")
    g.add_argument("--long-prefill-token-threshold", type=int, default=None, metavar="N",
                   help="chunked prefill: at most N tokens of one request a step (default: the step's budget), so "
                   "that long prompts share steps with shorter ones")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: triton kernels on CUDA, the torch reference elsewhere")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks to shard the model over (GPUs on CUDA, processes on CPU); must divide the attention "
                        "heads, kv heads and MLP width")
    g.add_argument("--chat-template", default=None, help="chat template: a file path or the template text")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name the API reports and accepts; several names: the first is reported, any is "
                        "accepted (as vLLM)")
    g.add_argument("--generation-config", default="auto",
                   help="default sampling for fields a request leaves unset: auto (the model's "
                        "generation_config.json), vllm (none: OpenAI's defaults), or a folder with one")
    g.add_argument("--override-generation-config", type=_json_object, default=None, metavar="JSON",
                   help='default sampling fields on top, e.g. \'{"temperature": 0.5}\'')
    g.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (PEFT folders) beside the base model; see --lora-modules")
    g.add_argument("--max-loras", type=int, default=4, help="LoRA adapters resident on the device at once")
    g.add_argument("--max-lora-rank", type=int, default=16, help="the largest LoRA rank an adapter may have")
    g.add_argument("--hf-overrides", type=_json_object, default=None, metavar="JSON",
                   help='fields of the model\'s config.json set on top at load, e.g. \'{"rope_scaling": {"rope_type": '
                        '"yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}\' (Qwen\'s long-context '
                        'recipe) or \'{"max_position_embeddings": 65536}\'')
    g.add_argument("--rope-scaling", type=_json_object, default=None, metavar="JSON",
                   help="the rotary scaling on top of the model's (as --hf-overrides '{\"rope_scaling\": JSON}')")
    g.add_argument("--rope-theta", type=float, default=None, help="the rotary base on top of the model's")
    g.add_argument("--revision", default=None, help="Hub models: the branch, tag or commit to download")
    g.add_argument("--hf-token", nargs="?", const=True, default=None, metavar="TOKEN",
                   help="Hub models: the token for gated or private ones (alone: the one `hf auth login` stored; "
                   "default: HF_TOKEN or that stored one)")
    g.add_argument("--download-dir", default=None, help="Hub models: where to download them (default: the Hugging "
                                                        "Face cache)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="the most logprobs / prompt_logprobs / top_logprobs a request may ask for (at most 20)")
    g.add_argument("--kv-offloading-size", type=float, default=None, metavar="GIB",
                   help="CPU memory (GiB) for prefix-cache blocks evicted from the device: a later prompt with that "
                        "prefix copies them back instead of recomputing them (models with windowed and "
                        "full-attention layers then keep one block table for every layer)")
    g.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="models with windowed and full-attention layers (Gemma 2 / 3, gpt-oss): keep the whole context "
                        "on the windowed layers too (by default they hold each request's window only)")
    g.add_argument("--enable-sleep-mode", action="store_true",
                   help="serve POST /sleep?level=1|2, POST /wake_up[?tags=weights|kv_cache] and GET /is_sleeping: give "
                        "the GPU's memory back between generations (e.g. to a trainer) and take it again")
    g.add_argument("--disable-sliding-window", action="store_true",
                   help="full attention on every layer, the context capped at the model's sliding window")
    c = parser.add_argument_group("vLLM flags accepted for compatibility (they ask for what pagedserve does anyway)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="accepted: pagedserve runs its own model code and never a checkpoint's Python, so models "
                        "load the same without it")
    c.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="long prompts are always chunked (prefills share steps with decodes); "
                        "--no-enable-chunked-prefill is refused")
    c.add_argument("--disable-log-requests", action="store_true",
                   help="accepted: request contents are never logged")
    c.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                   help="accepted: a preempted request frees its blocks and is recomputed (no CPU swap space)")
    c.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="1 only (pipeline parallelism is not supported; use --tensor-parallel-size)")
    c.add_argument("--distributed-executor-backend", default=None, choices=["mp", "uni", "ray", "external_launcher"],
                   help="mp (or uni with one GPU): the tensor-parallel ranks are local processes; ray and "
                        "external_launcher are refused")
    c.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="accepted: tensor parallelism uses torch.distributed's all-reduce (NCCL) only")
    c.add_argument("--max-seq-len-to-capture", type=int, default=None,
                   help="accepted: the decode CUDA graphs serve every length up to --max-model-len")
    g.add_argument("--speculative-config", type=_speculative_config, default=None, metavar="JSON",
                   help='speculative decoding by n-gram lookup, e.g. \'{"method": "ngram", "num_speculative_tokens": '
                        '4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\', or by a draft model of the same '
                        'tokenizer: \'{"method": "draft_model", "model": "Qwen/Qwen2.5-0.5B-Instruct", '
                        '"num_speculative_tokens": 4}\'')


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _speculative_config(text: str) -> dict:
    from pagedserve.spec_decode import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text).as_dict()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _first_name(names: str | list[str] | None) -> str | None:
    """--served-model-name's first name (the one the API reports)."""
    return names[0] if isinstance(names, list) and names else names or None


def _hf_overrides(args: argparse.Namespace) -> dict | None:
    """--hf-overrides with --rope-scaling / --rope-theta folded in (those two win)."""
    out = dict(getattr(args, "hf_overrides", None) or {})
    if getattr(args, "rope_scaling", None) is not None:
        out["rope_scaling"] = args.rope_scaling
    if getattr(args, "rope_theta", None) is not None:
        out["rope_theta"] = args.rope_theta
    return out or None


def config_from_args(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    if getattr(args, "enable_chunked_prefill", True) is False:
        raise ValueError("--no-enable-chunked-prefill is not supported: pagedserve always chunks long prompts "
                         "(--long-prefill-token-threshold and --max-num-batched-tokens size the chunks)")
    backend = getattr(args, "distributed_executor_backend", None)
    if backend in ("ray", "external_launcher"):
        raise ValueError(f"--distributed-executor-backend {backend}: pagedserve starts its tensor-parallel ranks as "
                         "local processes of one machine (mp); multi-node backends are not supported")
    if getattr(args, "pipeline_parallel_size", 1) != 1:
        raise ValueError(f"--pipeline-parallel-size {args.pipeline_parallel_size}: pipeline parallelism is not "
                         "supported; use --tensor-parallel-size")
    model = getattr(args, "model_tag", None) or args.model
    kwargs = dict(
        model=model, tokenizer=args.tokenizer, dtype=normalize_dtype_name(args.dtype), device=args.device,
        load_format=args.load_format, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        seed=args.seed, max_model_len=args.max_model_len,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager, skip_warmup=args.skip_warmup, attention_backend=args.attention_backend,
        async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size, chat_template=args.chat_template,
        served_model_name=_first_name(args.served_model_name), generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        enable_lora=bool(getattr(args, "enable_lora", False) or getattr(args, "lora_modules", None)),
        max_loras=getattr(args, "max_loras", 4), max_lora_rank=getattr(args, "max_lora_rank", 16),
        speculative_config=getattr(args, "speculative_config", None),
        scheduling_policy=getattr(args, "scheduling_policy", "fcfs"),
        long_prefill_token_threshold=getattr(args, "long_prefill_token_threshold", None),
        hf_overrides=_hf_overrides(args), revision=getattr(args, "revision", None),
        download_dir=getattr(args, "download_dir", None), hf_token=getattr(args, "hf_token", None),
        max_logprobs=getattr(args, "max_logprobs", 20),
        disable_sliding_window=bool(getattr(args, "disable_sliding_window", False)),
        kv_offloading_size=getattr(args, "kv_offloading_size", None),
        disable_hybrid_kv_cache_manager=getattr(args, "disable_hybrid_kv_cache_manager", False),
        enable_sleep_mode=bool(getattr(args, "enable_sleep_mode", False)),
    )
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv) (sys.argv's by default) on top of a --config file's defaults (apply_config_file);
    ValueError for a bad file."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """vLLM's `--config FILE.yaml`: the file's keys (flag names, with dashes or underscores) become the parser's
    defaults, so flags given on the command line win. true / false switch a flag on or off (`--no-...` ones too),
    a list gives a flag's values, a mapping a JSON flag's object. ValueError for an unknown key or a bad value, naming
    the file."""
    path = _config_path(argv)
    if path is None:
        return
    import yaml

    parser = _command_parser(parser, argv)

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--config: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    options = parser._option_string_actions
    defaults = {}
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None or flag == "--config" or isinstance(action, argparse._HelpAction):
            raise ValueError(f"--config: {path}: unknown flag {key!r}")
        defaults[action.dest] = _config_value(action, value, f"--config: {path}: {key}")
    parser.set_defaults(**defaults)


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command's own parser: `pagedserve bench throughput ...` -> throughput's."""
    start = 0
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            return parser
        i = next((i for i in range(start, len(argv)) if argv[i] in sub.choices), None)
        if i is None:
            return parser
        parser, start = sub.choices[argv[i]], i + 1


def _config_path(argv: list[str]) -> str | None:
    path = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def _config_value(action: argparse.Action, value, where: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if isinstance(action, argparse._StoreConstAction):
        raise ValueError(f"{where}: not settable from a config file")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return [_config_one(action, v, where) for v in (value if isinstance(value, list) else [value])]
    return _config_one(action, value, where)


def _config_one(action: argparse.Action, value, where: str):
    import json

    text = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
    try:
        result = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return result
