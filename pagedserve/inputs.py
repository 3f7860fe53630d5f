"""Prompt shapes of the offline API, under vLLM's names (`from vllm.inputs import TokensPrompt` reads
`from pagedserve.inputs import TokensPrompt` here). LLM.generate also takes a plain string or a list of token ids."""

from __future__ import annotations

from typing import Any, TypedDict

try:  # Python 3.11+: typing.NotRequired
    from typing import NotRequired
except ImportError:  # pragma: no cover
    from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    """A prompt as text: the engine tokenizes it (special tokens added as the tokenizer does)."""

    prompt: str
    cache_salt: NotRequired[str]  # a prefix-cache namespace: only requests with the same salt share cached blocks


class TokensPrompt(TypedDict):
    """A prompt as token ids (used as they are); `prompt` only names its text in the output."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


SingletonPrompt = str | TextPrompt | TokensPrompt
PromptType = SingletonPrompt | list[int] | dict[str, Any]

# The keys a prompt dict may hold (vLLM's TextPrompt / TokensPrompt); the multimodal ones only empty (text-only
# models here).
PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt", "multi_modal_data", "mm_processor_kwargs",
                         "multi_modal_uuids", "token_type_ids"})
EMPTY_ONLY_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids", "token_type_ids")

__all__ = ["PROMPT_KEYS", "PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt"]
