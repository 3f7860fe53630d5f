"""Load a model from a HF folder, a Hub id, a GGUF file, or random ("dummy") weights.

    resolve_model_path(model)  ->  ModelSource(kind="folder" | "gguf" | "hub", path)   (no network)
    fetch_model_source(model)  ->  the same, with a Hub id downloaded to a local folder
    load_model(config, model, device, dtype) -> (model, hf_config)

Weights stream one tensor at a time into a model that was built in place on the target device
(parameters are uninitialized until loaded), so peak memory is about one model plus one tensor.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedserve.config import EngineConfig
from pagedserve.executor.gguf_loader import gguf_hf_config, iterate_gguf_weights
from pagedserve.executor.models import get_model_class, is_bare, is_classifier

logger = logging.getLogger(__name__)

# What we fetch from the Hub: configs, safetensors weights and tokenizer files (never *.bin / *.pt).
HUB_ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
]


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "folder" (config.json + safetensors) | "gguf" (one .gguf file) | "hub" (a Hub repo id)
    path: str  # the folder, the .gguf file, or the repo id

    @property
    def folder(self) -> str:
        """Where the tokenizer / generation config files live (a GGUF file's folder)."""
        return os.path.dirname(self.path) if self.kind == "gguf" else self.path


def resolve_model_path(model: str, load_format: str = "auto") -> ModelSource:
    """Tell what kind of source `model` names, without touching the network."""
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if path.endswith(".gguf") or load_format == "gguf":
            return ModelSource("gguf", path)
        raise ValueError(f"{model!r} is a file but not a .gguf; pass a GGUF file or a model folder")
    if os.path.isdir(path):
        has_config = os.path.isfile(os.path.join(path, "config.json"))
        has_safetensors = bool(glob.glob(os.path.join(path, "*.safetensors")))
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        wants_gguf = load_format == "gguf" or (load_format == "auto" and not has_safetensors and ggufs)
        if wants_gguf:
            if len(ggufs) != 1:
                raise ValueError(f"folder {model!r} holds {len(ggufs)} .gguf files; pass the path of one")
            return ModelSource("gguf", ggufs[0])
        if not has_config:
            raise ValueError(f"folder {model!r} has no config.json (and no single .gguf file); pass a HF "
                             "model folder (config.json + *.safetensors) or a .gguf file")
        return ModelSource("folder", path)
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path:
        raise ValueError(f"model path {model!r} does not exist")
    return ModelSource("hub", model)


def download_from_hub(repo_id: str, load_format: str = "auto", revision: str | None = None,
                      download_dir: str | None = None, token: str | bool | None = None) -> str:
    """snapshot_download the files we use (of `revision`: a branch, tag or commit; into `download_dir`, else the
    Hugging Face cache); clear errors when offline or the id is unknown."""
    from huggingface_hub import snapshot_download

    patterns = HUB_ALLOW_PATTERNS
    if load_format == "dummy":  # random weights: only configs and tokenizer files are needed
        patterns = [p for p in patterns if "safetensors" not in p]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, revision=revision, cache_dir=download_dir,
                                   token=token)
    except Exception as e:  # offline, unknown repo, gated repo, HTTP errors: all need the same advice
        raise ValueError(
            f"could not get model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If you are offline or it is not a Hub id, pass a local folder (config.json + *.safetensors) "
            "or a .gguf file instead."
        ) from e
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"Hub repo {repo_id!r} has no config.json; pass a local folder or a .gguf file")
    return folder


def fetch_model_source(model: str, load_format: str = "auto", revision: str | None = None,
                       download_dir: str | None = None, token: str | bool | None = None) -> ModelSource:
    """resolve_model_path, then download a Hub id (with `token`, vLLM's --hf-token); the result is always local
    (folder or gguf)."""
    source = resolve_model_path(model, load_format)
    if source.kind == "hub":
        source = ModelSource("folder", download_from_hub(source.path, load_format, revision, download_dir, token))
    return source


def cap_to_sliding_window(hf_config: Any) -> None:
    """--disable-sliding-window, as vLLM: a model with a sliding window serves a context no longer than the window
    (max_position_embeddings lowered to it, YaRN's extension dropped), where its windowed and full layers agree."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return
    from pagedserve.executor.layers import rope_max_positions

    if rope_max_positions(hf_config) > window:
        hf_config.max_position_embeddings = min(int(getattr(hf_config, "max_position_embeddings", window)),
                                                int(window))
        if rope_max_positions(hf_config) > window:  # YaRN's longer context: not with the window disabled
            raise ValueError(f"--disable-sliding-window with rope scaling that extends the context past the window "
                             f"({window}) is not supported")


def class_labels(hf_config: Any) -> list[str]:
    """A sequence classifier's label names by index: the config's id2label (its keys may be strings, as config.json
    stores them), else LABEL_0 .. LABEL_{num_labels - 1} (num_labels: Transformers' default of 2 when unset)."""
    id2label = getattr(hf_config, "id2label", None) or {}
    if id2label:
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
    return [f"LABEL_{i}" for i in range(int(getattr(hf_config, "num_labels", None) or 2))]


def apply_hf_overrides(hf_config: Any, overrides: dict | None) -> Any:
    """Sets config.json fields on top of a loaded config (vLLM's --hf-overrides), in place. `rope_scaling` /
    `rope_parameters` (and `rope_theta`) update the rotary parameters whichever form the config holds them in
    (transformers 4.x's rope_scaling + rope_theta, or 5.x's rope_parameters), so e.g.
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}} turns YaRN
    on without editing the checkpoint."""
    for key, value in (overrides or {}).items():
        if key in ("rope_scaling", "rope_parameters", "rope_theta"):
            if key == "rope_theta":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"hf_overrides: rope_theta must be a positive number, got {value!r}")
                update = {"rope_theta": float(value)}
            elif isinstance(value, dict):
                update = dict(value)
            else:
                raise ValueError(f"hf_overrides: {key} must be a JSON object, got {value!r}")
            if "type" in update and "rope_type" not in update:
                update["rope_type"] = update.pop("type")
            params = getattr(hf_config, "rope_parameters", None)
            if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
                raise ValueError(f"hf_overrides: {key} of a model with rotary parameters per layer type is not "
                                 "supported; override rope_parameters per type instead")
            if isinstance(params, dict):
                hf_config.rope_parameters = {**params, **update}
            if key == "rope_theta":
                hf_config.rope_theta = float(value)
            else:
                scaling = getattr(hf_config, "rope_scaling", None)
                hf_config.rope_scaling = {**(scaling if isinstance(scaling, dict) else {}),
                                          **{k: v for k, v in update.items() if k != "rope_theta"}}
            continue
        setattr(hf_config, key, value)
    return hf_config


def safetensors_files(folder: str) -> list[str]:
    """The shards named by model.safetensors.index.json when present, else every *.safetensors."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder!r} (PyTorch .bin checkpoints are not "
                         "supported); convert them with save_pretrained(safe_serialization=True), "
                         "or use load_format='dummy' for random weights")
    return files


def iterate_safetensors(folder: str, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    # safetensors can read straight onto the GPU, which skips a host copy of every tensor.
    target = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device=target) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights: N(0, 0.02) for matrices and biases, ones for norms; generated on the
    model's device (fast for a 7B on GPU) and deterministic for a given seed and device type."""
    for name, param in model.named_parameters():  # named_parameters skips a tied lm_head
        if "norm" in name:
            param.fill_(1.0)
            continue
        if name.endswith((".w4_qweight", ".w4_scales", ".w4_zs")):  # 4-bit storage (_dummy_int4)
            _dummy_int4_part(name, param, seed)
            continue
        generator = torch.Generator(device=param.device)
        # One seed per tensor, so a tensor's values do not depend on the tensors before it.
        generator.manual_seed(seed * 1_000_003 + _stable_hash(name))
        param.normal_(0.0, 0.02, generator=generator)


def _dummy_int4_part(name: str, param: torch.Tensor, seed: int) -> None:
    """Random 4-bit words; scales of 0.02 / 4.6 (uniform 0..15 less 8, times it: a spread of ~0.02); zero 8."""
    if name.endswith(".w4_qweight"):
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed * 1_000_003 + _stable_hash(name))
        param.copy_(torch.randint(-2**31, 2**31 - 1, param.shape, generator=generator, device=param.device,
                                  dtype=torch.int64).to(torch.int32))
    else:
        param.fill_(0.02 / 4.6 * (8.0 if name.endswith(".w4_zs") else 1.0))


def _stable_hash(text: str) -> int:
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) % (1 << 31)
    return value


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# read_plain_config: model types whose config.json, when it spells out every field the model reads, is
# used as plain attributes (AutoConfig costs ~10 s of imports at start-up on some images: in
# transformers 5.17 any model config class pulls sklearn, sympy and torch._dynamo through its
# generated docstring; measured in docs/gpu-notes.md, session 3).
_PLAIN_CONFIG_TYPES = ("qwen2", "llama")
_PLAIN_CONFIG_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                        "tie_word_embeddings")


def read_plain_config(folder: str) -> Any | None:
    """config.json as a namespace of its fields, or None (then AutoConfig reads it).

    Only where nothing is left to a config class's defaults or conversions: a qwen2/llama model type,
    every field in _PLAIN_CONFIG_FIELDS present, no rope scaling (plain rope_theta, or rope_parameters of
    rope_type "default"), no sliding window. The model reads the rest with getattr and the same
    defaults as those classes (num_key_value_heads = num_attention_heads, head_dim = hidden /
    heads, silu, rope_theta 10000, no biases)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("model_type") not in _PLAIN_CONFIG_TYPES:
        return None
    if any(data.get(name) is None for name in _PLAIN_CONFIG_FIELDS):
        return None
    rope = data.get("rope_parameters")
    if data.get("rope_scaling") is not None or (rope is not None and (
            not isinstance(rope, dict) or rope.get("rope_type", "default") != "default")):
        return None
    if data.get("use_sliding_window") or data.get("hidden_act", "silu") != "silu":
        return None
    import types

    return types.SimpleNamespace(**data)


def load_hf_config(source: ModelSource) -> Any:
    if source.kind == "gguf":
        return gguf_hf_config(source.path)
    plain = read_plain_config(source.path)
    if plain is not None:
        return plain
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read {source.path}/config.json: {e}") from e
    if "Gemma3ForConditionalGeneration" in (getattr(config, "architectures", None) or []):
        from pagedserve.executor.models.gemma import text_config_of

        config = text_config_of(config)  # served as text: the language model's config
    return config


def load_model(
    config: EngineConfig, model_path: str, device: torch.device | str, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    """Build the model for `model_path` on `device` in `dtype` and fill its weights.

    config.load_format: auto | safetensors | gguf | dummy (random weights, only config.json needed);
    config.max_model_len sizes the rotary cache when it exceeds max_position_embeddings.
    Returns (model in eval mode, HF config).
    """
    device = torch.device(device)
    t0 = time.monotonic()
    source = fetch_model_source(model_path, config.load_format, config.revision, config.download_dir,
                                config.hf_token)
    hf_config = apply_hf_overrides(load_hf_config(source), config.hf_overrides)
    if config.disable_sliding_window:
        cap_to_sliding_window(hf_config)
    from pagedserve.executor.int_quant import INT_METHODS
    from pagedserve.executor.quantization import checkpoint_quantization

    stored_quantization = checkpoint_quantization(hf_config)  # a ValueError for a method we cannot run
    model_cls = get_model_class(getattr(hf_config, "architectures", None))
    t_config = time.monotonic()
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(hf_config, config.max_model_len)
        classifier = is_classifier(getattr(hf_config, "architectures", None))
        if classifier:  # *ForSequenceClassification: a score head on the last token, no LM head
            from pagedserve.executor.layers import Linear

            model.id2label = class_labels(hf_config)
            model.num_labels = len(model.id2label)
            model.score = Linear(int(hf_config.hidden_size), model.num_labels, bias=False)
    model.eval()
    # pooling only: a bare decoder (embeddings; also a checkpoint without an LM head, below) or a classifier
    model.embedding_only = is_bare(getattr(hf_config, "architectures", None)) or classifier
    t_built = time.monotonic()
    logger.info("start-up: config in %.1f s, model built on %s in %.1f s", t_config - t0, device, t_built - t_config)

    if config.load_format == "dummy":
        stored = None
        if stored_quantization in INT_METHODS:  # a 4-bit config's shapes: random 4-bit projections
            stored = _dummy_int4(model, config, hf_config, device, dtype)
        init_dummy_weights(model, config.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logger.info("start-up: dummy weights in %.1f s", time.monotonic() - t_built)
        return _quantized(model, config, stored), hf_config
    if source.kind == "gguf":
        weights = iterate_gguf_weights(source.path, hf_config)
    else:
        weights = iterate_safetensors(source.path, device)
    if stored_quantization in INT_METHODS:  # integer weights: dequantized as they stream in, or kept 4-bit
        from pagedserve.executor.int_quant import dequantize_stream, int_quant_config

        qc = hf_config.quantization_config
        int_config = int_quant_config(qc if isinstance(qc, dict) else qc.to_dict())
        keep_int4 = _keeps_int4(config, int_config, device, dtype)
        weights = dequantize_stream(int_config, weights, keep_int4)
        logger.info("start-up: %s weights %s", stored_quantization,
                    "kept 4-bit (the w4a16 kernel)" if keep_int4 else f"dequantized to {dtype} at load")
        stored_quantization = "int4" if keep_int4 else None
    elif stored_quantization == "mxfp4":  # gpt-oss's experts
        from pagedserve.executor.quantization import dequantize_mxfp4

        weights = dequantize_mxfp4(weights, dtype)
        logger.info("start-up: MXFP4 experts dequantized to %s at load", dtype)
        stored_quantization = None
    elif stored_quantization == "fp8-block":  # dequantized as they stream in, then fp8 again with a scale per row
        from pagedserve.executor.quantization import dequantize_fp8_blocks, fp8_block_size

        qc = hf_config.quantization_config
        block = fp8_block_size(qc if isinstance(qc, dict) else qc.to_dict())
        weights = dequantize_fp8_blocks(weights, block)
        logger.info("start-up: block-wise fp8 weights (blocks of %d x %d) dequantized, then fp8 with a scale per row",
                    *block)
        stored_quantization = None
        config = config if config.quantization is not None else config.replace(quantization="fp8")
    with torch.no_grad():
        loaded = model.load_weights(weights)
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing == ["lm_head.weight"]:  # a decoder saved without its LM head (embedding checkpoints often are)
        model.lm_head.weight.data.zero_()
        model.embedding_only, missing = True, []
    if classifier:
        logger.info("%s is a sequence classifier (%s, %d labels): it serves classification and scoring only",
                    source.path, hf_config.architectures, model.num_labels)
    elif model.embedding_only:
        logger.info("%s is a bare decoder (%s): it serves embeddings only", source.path, hf_config.architectures)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {source.path!r} lacks weights for {shown}")
    if stored_quantization == "int4" and not any(getattr(m, "w4_qweight", None) is not None for m in model.modules()):
        stored_quantization = None  # every projection came dequantized (act-order groups, ...)
    if stored_quantization == "fp8":
        from pagedserve.executor.layers import Linear

        for name, module in model.named_modules():
            if isinstance(module, Linear):
                try:
                    module.finish_fp8_load(dtype)
                except ValueError as e:
                    raise ValueError(f"checkpoint {source.path!r}, {name}: {e}") from None
        logger.info("start-up: %s weights as stored in the checkpoint", stored_quantization)
    return _quantized(model, config, stored_quantization), hf_config


def _dummy_int4(model: nn.Module, config: EngineConfig, hf_config: Any, device: torch.device,
                dtype: torch.dtype) -> str | None:
    """--load-format dummy on a 4-bit (AWQ / GPTQ) config: where the checkpoint's projections would stay 4-bit, each
    decoder projection gets 4-bit storage (init_dummy_weights then fills it: random values 0..15, scales that make
    weights of about N(0, 0.02)), so the 4-bit shapes can be benchmarked without a checkpoint. Returns "int4", or
    None when they would be dequantized (then the model keeps random 16-bit weights)."""
    from pagedserve.executor.int_quant import int_quant_config
    from pagedserve.executor.layers import Linear

    qc = hf_config.quantization_config
    int_config = int_quant_config(qc if isinstance(qc, dict) else qc.to_dict())
    if not _keeps_int4(config, int_config, device, dtype):
        return None
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not name.endswith("lm_head") and ".experts." not in name:
            group = int_config.group_size if int_config.group_size > 0 else module.in_features
            module.use_int4_storage(module.in_features // group)
            count += 1
    return "int4" if count else None


def _keeps_int4(config: EngineConfig, int_config: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a 4-bit checkpoint's projections stay 4-bit (kernels/w4a16.py): on CUDA with a 16-bit model (or
    PAGEDSERVE_INT4_KERNELS=1: the Triton interpreter, tests), one rank, no LoRA and no --quantization;
    PAGEDSERVE_INT4_KERNELS=0 dequantizes them."""
    from pagedserve.distributed import tp_size

    mode = os.environ.get("PAGEDSERVE_INT4_KERNELS", "auto")
    if mode == "0" or int_config.bits != 4 or config.quantization is not None or config.enable_lora or tp_size() > 1:
        return False
    return mode == "1" or (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16))


def _quantized(model: nn.Module, config: EngineConfig, stored: str | None = None) -> nn.Module:
    """A checkpoint's KV-cache scales folded into the weights for an fp8 cache (kv_scales.py), then online
    quantization if asked; `model.quantization` says how its projections are held (the engine reports it, the
    bench's floor counts their bytes by it): config.quantization, or what the checkpoint stores."""
    from pagedserve.executor.kv_scales import fold_kv_scales

    fold_kv_scales(model, config.kv_cache_dtype)
    if config.quantization is not None:
        from pagedserve.executor.quantization import quantize_model

        quantize_model(model, config.quantization)
    model.quantization = config.quantization or stored
    return model


def get_eos_token_ids(hf_config: Any, folder: str | None = None) -> set[int]:
    """EOS ids from the model config plus generation_config.json (instruct models often list
    several there, e.g. Qwen2.5's <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()

    def add(value: object) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen_path = os.path.join(folder, "generation_config.json") if folder else None
    if gen_path and os.path.isfile(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    return ids
