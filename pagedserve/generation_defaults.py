"""Default sampling parameters from the model's generation_config.json, as vLLM's `--generation-config auto`.

Model creators ship their recommended decoding there (Qwen2-7B-Instruct: temperature 0.7, top_p 0.8,
top_k 20, repetition_penalty 1.05). A request that leaves one of those fields unset gets the model's value
instead of the built-in default (OpenAI's: temperature 1, no top-p/top-k, no penalty); a request that sets
it keeps its own. The offline API's `LLM.generate(prompts)` without sampling parameters uses them too
(`LLM.get_default_sampling_params()`).

    mode "auto"   generation_config.json of the model's folder (nothing when there is none)
    mode "vllm"   none: the built-in defaults (vLLM's name for it; "none" is accepted too)
    a folder      that folder's generation_config.json (an error when it has none)
    override      a dict merged on top, e.g. {"temperature": 0.0}

Only the sampling fields are read: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens as
the default max_tokens (as vLLM's get_diff_sampling_param; a request's own max_tokens wins here).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
BUILTIN = {k: getattr(SamplingParams(), k) for k in FIELDS}  # what a request gets without these defaults
_RENAMED = {"max_new_tokens": "max_tokens"}  # generation_config.json's names -> SamplingParams'
_NONE_MODES = ("vllm", "none")


def load_generation_defaults(model_folder: str | None, mode: str = "auto",
                             override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampling fields that differ from the built-in defaults, checked. Raises ValueError on a
    missing folder, an unreadable file, an unknown override key or an invalid value."""
    found: dict[str, Any] = {}
    source = "override"
    if mode in _NONE_MODES:
        pass
    elif mode == "auto":
        if model_folder and os.path.isfile(path := os.path.join(model_folder, "generation_config.json")):
            found, source = _read(path), path
    else:
        path = os.path.join(mode, "generation_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--generation-config {mode!r}: no generation_config.json there "
                             "(use auto, vllm, or a folder that has one)")
        found, source = _read(path), path
    found = {_RENAMED.get(k, k): v for k, v in found.items() if k != "max_tokens"}  # (not a generation_config key)
    defaults = {k: found[k] for k in FIELDS if found.get(k) is not None}
    if override:
        unknown = sorted(set(override) - set(FIELDS) - set(_RENAMED) | set(override) & {"max_tokens"})
        override = {_RENAMED.get(k, k): v for k, v in override.items()}
        if unknown:
            raise ValueError(f"override_generation_config: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(k for k in FIELDS if k != 'max_tokens')}, max_new_tokens")
        defaults.update(override)
    if defaults.get("top_k") == -1:
        defaults["top_k"] = 0
    # (max_tokens stays even at 16: the server's own default is "up to the context", not SamplingParams' 16)
    defaults = {k: v for k, v in defaults.items() if k == "max_tokens" or v != BUILTIN[k]}
    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"default sampling parameters from {source}: {e}") from None
    if defaults:
        logger.info("default sampling parameters from %s: %s (a request's own values win; "
                    "--generation-config vllm turns these off)", source,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data
