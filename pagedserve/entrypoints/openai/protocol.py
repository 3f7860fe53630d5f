"""Pydantic models of the OpenAI API shapes this server speaks.

Requests are validated strictly by JSON type (a string is not an integer, `true` is not 1), and
unknown fields are accepted and ignored, as OpenAI clients send fields we do not know yet. Range
checks live in `SamplingParams` (one place, one message per rule); the serving code maps its
`ValueError` to a 400. Response models document the API in /openapi.json; the serving code builds
the same shapes as plain dicts on the hot path.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from pagedserve.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema's "integer" includes 2.0; JSON has one number type. Booleans stay rejected.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral_float_to_int)]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# --------------------------------------------------------------------------- errors
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# --------------------------------------------------------------------------- shared request fields
class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM extra: usage in every chunk


class SamplingFields(OpenAIBaseModel):
    """Fields common to chat and completions: OpenAI's, then vLLM's extras. The bounds in the
    schema are SamplingParams' (pagedserve/sampling_params.py), which checks them again."""

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        if value is not None and not -(2**63) <= value <= 2**64 - 1:
            raise ValueError(f"seed must be a 64-bit integer, from {-(2**63)} to {2**64 - 1}")
        return value

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty",
                     "length_penalty", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if isinstance(value, float) and value != value:  # NaN passes no bound check clearly ("should be <= 100")
            raise ValueError("must be a number, got NaN")
        return value

    model: str | None = Field(default=None, description="the served model name; may be omitted")
    max_tokens: Int | None = Field(default=None, ge=1, description="most tokens to generate")
    n: Int | None = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0, le=100, description="default 1; 0: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, description=f"at most {MAX_STOP_STRINGS} strings")
    seed: Int | None = None  # 64-bit, either sign's range: checked by _seed_in_range (Field bounds print as floats)
    presence_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> bias in [-100, 100]"
    )
    user: str | None = None  # accepted and ignored
    # vLLM extras
    top_k: Int | None = Field(default=None, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: Int | None = Field(default=0, ge=0)
    ignore_eos: bool | None = False
    priority: Int | None = Field(default=0, description="with --scheduling-policy priority: lower runs first")
    return_token_ids: bool | None = Field(
        default=None, description="vLLM's: the prompt's token ids (prompt_token_ids) and each choice's (token_ids) "
        "beside the text; streamed: the prompt's in the first chunk, each chunk's new ids in its choice")
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description='logprobs tokens as "token_id:N" (default: --return-tokens-as-token-ids)')
    cache_salt: str | None = Field(default=None, min_length=1,
                                   description="prefix-cache namespace: only requests with the same salt share blocks")
    truncate_prompt_tokens: Int | None = Field(default=None, ge=1, description="keep the prompt's last N tokens")
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None
    allowed_token_ids: list[Annotated[Int, Field(ge=0)]] | None = Field(
        default=None, description="sample only among these token ids")
    bad_words: list[str] | None = Field(default=None, description="words never generated")
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    prompt_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                        description="logprobs of the prompt's tokens, with this many top ones")
    # Structured outputs (one of these): OpenAI's response_format {"type": "text" | "json_object" |
    # "json_schema", "json_schema": {"name": ..., "schema": {...}}}; vLLM's structured_outputs {"json" |
    # "json_object" | "regex" | "choice" | "grammar": ...} and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's beam search: n beams, the n best answers (not streamed; no logprobs or structured outputs)
    use_beam_search: bool | None = False
    length_penalty: float | None = Field(default=1.0, description="beam search: score = logprob sum / length ** this")


# --------------------------------------------------------------------------- chat
class PromptLogprob(OpenAIBaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls: {"id", "type", "function"}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's: the last message's content, when it is the response role's (an assistant message being continued),
    # comes before the answer in the message (or, streamed, as the first content delta)
    echo: bool | None = False
    max_completion_tokens: Int | None = Field(default=None, ge=1, description="alias of max_tokens (preferred)")
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {"name", "parameters", ...}}]
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"function": {"name"}}
    parallel_tool_calls: bool | None = None  # false: at most one tool call
    functions: list[dict[str, Any]] | None = None  # refused
    function_call: str | dict[str, Any] | None = None  # refused unless "none"
    modalities: list[str] | None = None  # only ["text"]
    audio: dict[str, Any] | None = None  # refused
    # vLLM extras
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. Qwen3's enable_thinking
    chat_template: str | None = None  # this request's own template: only with --trust-request-chat-template
    continue_final_message: bool = False  # the last (assistant) message left open, to be continued
    documents: list[dict[str, str]] | None = None  # for templates that render retrieved documents (RAG)
    # OpenAI's field: passed to the chat template as `reasoning_effort` (templates that read it, e.g. gpt-oss's)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


# --------------------------------------------------------------------------- tokenizer endpoints (vLLM's)
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes its own special tokens
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    return_token_strs: bool | None = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ChatLogprobTop(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = []


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatLogprobToken] | None = None


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None  # in streamed deltas


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    reasoning_content: str | None = None  # with --reasoning-parser: the thinking, apart from the answer
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, with prompt_logprobs


class ChatDelta(OpenAIBaseModel):
    role: str | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    """One Server-Sent Event of a streamed chat completion (`data: {...}`, then `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# --------------------------------------------------------------------------- completions
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    max_tokens: Int | None = Field(default=16, ge=0, description="0 only with echo: the prompt alone")
    echo: bool | None = False
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: Int | None = None  # refused unless equal to n
    suffix: str | None = None  # fill in the middle (a code model's FIM tokens: Tokenizer.fim_ids)


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's: with prompt_logprobs, one entry per prompt token (None for the first), token id -> its logprob
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(OpenAIBaseModel):
    """Also the shape of each streamed chunk (with `usage` only in the final usage chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- embeddings
class EmbeddingRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[str] | list[Int] | list[list[Int]] | None = Field(
        default=None, description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    # vLLM's chat form: one conversation rendered with the chat template (instead of `input`)
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(default=None, description="keep the first N values (then normalize)")
    user: str | None = None
    # vLLM's extras
    normalize: bool | None = Field(default=None, description="L2-normalize the vector (default true)")
    truncate_prompt_tokens: Int | None = Field(default=None, ge=1, description="embed only the last N tokens")
    add_special_tokens: bool = True


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format=base64


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


# --------------------------------------------------------------------------- LoRA adapters at run time
class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Int | None = None


# --------------------------------------------------------------------------- models, version
class ModelPermission(OpenAIBaseModel):
    """vLLM's (OpenAI's legacy) permission entry of a model card: everything a client may do here."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(OpenAIBaseModel):
    version: str


class HealthResponse(OpenAIBaseModel):
    status: str
