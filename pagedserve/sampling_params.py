"""Sampling parameters of one request, validated once at construction.

Names follow vLLM's `SamplingParams`, so code written for vLLM's offline API reads the same here.
Every invalid value raises `ValueError` with a message that says what to change; the server maps
it to an OpenAI error with HTTP 400.
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.pooling_params import PoolingParams

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 128  # vLLM has no bound; each is searched in every new piece of text
MAX_STOP_STRING_LEN = 1000
_GREEDY_EPS = 1e-5
MAX_CHOICES = 1024


def __getattr__(name: str) -> Any:
    if name == "BeamSearchParams":  # (vLLM's import path; defined in pagedserve.beam_search, which imports this)
        from pagedserve.beam_search import BeamSearchParams

        return BeamSearchParams
    raise AttributeError(name)


class RequestOutputKind(enum.Enum):
    """What AsyncEngine.generate yields for a request (vLLM's): the whole output so far each time (CUMULATIVE),
    only what is new since the last one (DELTA), or the finished output alone (FINAL_ONLY). LLM.generate
    returns finished outputs whatever the kind."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's `StructuredOutputsParams`): exactly one of
    `json` (a JSON Schema, as a dict or its JSON text), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings, verbatim) or `grammar` (EBNF in xgrammar's / GBNF's dialect).
    The engine compiles it when the request is added (pagedserve/structured_output.py); a schema or
    pattern that does not compile raises `ValueError` there. JSON may carry any whitespace between its
    tokens unless `disable_any_whitespace` (then one space after ':' and ',', no newlines: a model that
    would pad its JSON with whitespace forever cannot)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    # vLLM's other fields, for its backends' options. Here xgrammar holds every constraint, and a JSON Schema's
    # objects take no properties beyond those it names (as xgrammar in vLLM): disable_additional_properties,
    # disable_fallback and backend are taken and change nothing; whitespace_pattern and structural_tag are refused.
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    backend: str | None = None
    backend_was_auto: bool = False  # (vLLM 0.10's GuidedDecodingParams carries it; nothing here)

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        set_fields = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            set_fields.append("json_object")
        if len(set_fields) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, choice or grammar; "
                             f"got {', '.join(set_fields) if set_fields else 'none'}")
        for name in ("json_object", "disable_any_whitespace", "disable_fallback", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.whitespace_pattern is not None:
            raise ValueError("whitespace_pattern is not supported (xgrammar); disable_any_whitespace=True allows "
                             "no whitespace beyond single spaces")
        if self.structural_tag is not None:
            raise ValueError("structural_tag is not supported; use json, regex, choice or grammar")
        if self.backend not in (None, "auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"):
            raise ValueError("backend must be auto, xgrammar, guidance, outlines or lm-format-enforcer (xgrammar "
                             f"holds any constraint here), got {self.backend!r}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            elif not isinstance(self.json, dict):
                raise ValueError("json must be a JSON Schema object (or its JSON text), "
                                 f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice or len(self.choice) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
            if not all(is_valid_unicode(c) for c in self.choice):
                raise ValueError("choice holds a lone surrogate (not valid Unicode), which no tokens can spell")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    # Logprobs of each prompt token (from the second on) under the model, with this many top alternatives.
    # Such a request computes its whole prompt (no prefix-cache hit) until its first token is sampled.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these (vLLM's extra parameter)
    # vLLM's bad_words: words never generated (a word's last token is banned where the output ends with the rest of
    # it); the engine tokenizes them (with and without a leading space) into bad_words_token_ids.
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # False: no text is made (outputs' text stays ""; stop strings need text, so they are refused), as vLLM's.
    detokenize: bool = True
    # vLLM's; only slow (Python) tokenizers put spaces between special tokens, so with fast ones it changes nothing.
    spaces_between_special_tokens: bool = True
    # Keep only the prompt's last N tokens (-1: the last max_model_len, as vLLM); the engine cuts the prompt.
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None  # vLLM's free-form field for plugins: kept, never read here
    best_of: int | None = None  # vLLM V0's; only None or n (vLLM V1 dropped it too)
    logits_processors: list[Any] | None = None  # vLLM V0's per-request callables: only None or empty
    structured_outputs: StructuredOutputsParams | None = None  # a dict is taken as its fields
    guided_decoding: StructuredOutputsParams | None = None  # vLLM 0.10's name for structured_outputs (moved there)
    # An embedding request (LLM.embed, POST /v1/embeddings; made by SamplingParams.for_pooling): the prompt's last
    # hidden state comes back as RequestOutput.embedding and nothing is generated.
    pooling: PoolingParams | None = None

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """vLLM's SamplingParams.from_optional: None means the default (max_tokens None: up to the context)."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "max_tokens"})

    @classmethod
    def for_pooling(cls, pooling: PoolingParams | None = None) -> SamplingParams:
        """The parameters of an embedding request. The engine runs it as a one-token greedy request whose sampled
        token it drops: the prompt is computed (chunked, prefix-cached, batched) as any other."""
        return cls(max_tokens=1, temperature=0.0, pooling=pooling or PoolingParams())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # (a bare number or a dict is a caller's mistake: a ValueError saying so, not a TypeError from list())
        for name in ("stop", "stop_token_ids", "bad_words_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("pass structured_outputs or guided_decoding (its older name), not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown field
                raise ValueError(f"structured_outputs: {e}") from None
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize",
                     "spaces_between_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" or 0 would read as true, or as false, by accident
                fail(f"{name} must be True or False, got {type(value).__name__} {value!r}")

        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            fail(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            fail(f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2.0 <= v <= 2.0:
                fail(f"{name} must be in [-2, 2], got {v!r}")
        # (A penalty below 0.01 divides logits past fp32's range: +inf ties, then NaN probabilities.)
        if not is_num(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 10.0:
            fail(f"repetition_penalty must be in [0.01, 10], got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            fail(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            fail(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                fail(f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_LEN} chars")
            if not is_valid_unicode(s):
                fail(f"stop string {s!r} holds a lone surrogate (not valid Unicode): it could never match")
        if self.stop and not self.detokenize:
            fail("stop strings need detokenize=True (they are matched in the text); use stop_token_ids")
        for t in self.stop_token_ids:
            if not is_int(t) or t < 0:
                fail(f"stop_token_ids must be non-negative integers, got {t!r}")
        if self.truncate_prompt_tokens is not None and (not is_int(self.truncate_prompt_tokens)
                                                        or not (self.truncate_prompt_tokens >= 1
                                                                or self.truncate_prompt_tokens == -1)):
            fail(f"truncate_prompt_tokens must be a positive integer or -1, got {self.truncate_prompt_tokens!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            fail(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.best_of is not None and self.best_of != self.n:
            fail(f"best_of {self.best_of!r} is not supported (vLLM V1 dropped it too): ask for n choices, with "
                 "logprobs to rank them")
        if self.logits_processors:
            fail("per-request logits_processors are not supported (vLLM V1 dropped them too): use logit_bias, "
                 "allowed_token_ids, bad_words or structured_outputs")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            fail(f"extra_args must be a dict, got {type(self.extra_args).__name__}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias must map token ids to biases")
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                # (int() would also take " 5 ", "1_0" and other scripts' digits: a key is a token id's plain digits)
                if isinstance(k, bool) or not (is_int(k) or (isinstance(k, str) and k.isascii() and k.isdigit())):
                    fail(f"logit_bias keys must be token ids, got {k!r}")
                tok = int(k)
                if tok < 0 or not is_num(v) or not -100.0 <= v <= 100.0:
                    fail(f"logit_bias values must be in [-100, 100] for non-negative token ids, got {k!r}: {v!r}")
                bias[tok] = float(v)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            if isinstance(self.allowed_token_ids, (str, bytes)) or not hasattr(self.allowed_token_ids, "__iter__"):
                fail(f"allowed_token_ids must be a list of token ids, got {self.allowed_token_ids!r}")
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids:
                fail("allowed_token_ids must not be empty")
            for t in self.allowed_token_ids:
                if not is_int(t) or t < 0:
                    fail(f"allowed_token_ids must be non-negative integers, got {t!r}")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                fail(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
            if not all(is_valid_unicode(w) for w in self.bad_words):
                fail("bad_words holds a lone surrogate (not valid Unicode), which cannot be tokenized")
        if self.bad_words_token_ids is not None:
            if not all(isinstance(seq, (list, tuple)) for seq in self.bad_words_token_ids):
                fail("bad_words_token_ids must be non-empty lists of token ids")
            self.bad_words_token_ids = [list(seq) for seq in self.bad_words_token_ids]
            if not all(seq and all(is_int(t) and t >= 0 for t in seq) for seq in self.bad_words_token_ids):
                fail("bad_words_token_ids must be non-empty lists of token ids")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail(f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        if self.pooling is not None:
            if not isinstance(self.pooling, PoolingParams):
                fail(f"pooling must be a PoolingParams, got {type(self.pooling).__name__}")
            if (self.n != 1 or self.max_tokens != 1 or self.logprobs is not None or self.prompt_logprobs is not None
                    or self.structured_outputs is not None):
                fail("an embedding request (pooling) takes n=1, max_tokens=1 and no logprobs or structured outputs; "
                     "use SamplingParams.for_pooling")

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's SamplingParams.clone)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary of {vocab_size} tokens")
        for t in self.logit_bias or {}:
            if t >= vocab_size:
                raise ValueError(f"logit_bias names token {t}, outside the vocabulary of {vocab_size} tokens")
        for t in self.allowed_token_ids or []:
            if t >= vocab_size:
                raise ValueError(f"allowed_token_ids contains {t}, outside the vocabulary of {vocab_size} tokens")


def is_valid_unicode(text: str) -> bool:
    """False for a string with a lone surrogate (JSON's "\\ud800" alone): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


GuidedDecodingParams = StructuredOutputsParams  # vLLM 0.10's name
