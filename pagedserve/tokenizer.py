"""Tokenizer loading, chat templates, and the incremental (streaming) detokenizer.

The detokenizer turns one token at a time into text deltas that are safe to stream:
  * never half a character: byte-level BPE may split one UTF-8 character across tokens; a window
    that decodes to text ending in U+FFFD is held until the next token completes it;
  * never part of a stop string: the longest tail of the text that could still begin a stop string
    is held until it can't, so a client never sees text that later gets cut.
Invariant: "".join(all deltas returned by add_tokens and flush) == detokenizer.text.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from pagedserve.sampling_params import is_valid_unicode

_REPLACEMENT_CHAR = "\ufffd"
# Tokens of context decoded before the new ones: enough for tokenizers whose text for a token
# depends on its neighbours (SentencePiece's leading-space rule), as in vLLM and TGI.
_PREFIX_WINDOW = 5
_CHAT_ROLES = ("system", "user", "assistant", "tool")


# Fill-in-the-middle tokens, (prefix, suffix, middle) in the order each family's prompts put them (Tokenizer.fim_ids).
_FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeQwen
               ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder(2), Granite Code
               ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))  # DeepSeek-Coder


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer with the few calls the engine needs."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: set[int] | None = None,
                 chat_template: str | None = None) -> None:
        self.hf = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        ids = set(eos_token_ids or ())
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids: set[int] = ids
        self.chat_template: str | None = chat_template or getattr(hf_tokenizer, "chat_template", None)
        # The Rust tokenizer behind a fast HF tokenizer decodes ~5x faster than the Python wrapper
        # (the detokenizer calls decode twice per token of every running request, every step).
        # Only when the wrapper would add nothing: no clean-up of tokenization spaces.
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        cleans_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self._fast_decode = None if backend is None or cleans_up else backend.decode
        self._fim_vocab: dict[str, int] | None = None  # fim_ids' tokens, looked up once

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (may be < the model's logits width)."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        except TypeError:
            if isinstance(text, str) and not is_valid_unicode(text):  # (the Rust tokenizer's TypeError says nothing)
                raise ValueError("the text holds a lone surrogate (a \\ud800-\\udfff escape not in a pair), which is "
                                 "not valid Unicode and cannot be tokenized") from None
            raise

    def fim_ids(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt (prefix, suffix, then the model writes the middle) in the model's own FIM tokens,
        prefix-suffix-middle order: Qwen2.5-Coder's <|fim_prefix|> / <|fim_suffix|> / <|fim_middle|>, StarCoder's
        <fim_prefix> / <fim_suffix> / <fim_middle>, DeepSeek-Coder's <｜fim▁begin｜> / <｜fim▁hole｜> / <｜fim▁end｜>.
        ValueError for a tokenizer without any of them."""
        vocab = self._special_vocab()
        for names in _FIM_TOKENS:
            if all(name in vocab for name in names):
                pre, suf, mid = (vocab[name] for name in names)
                return ([pre] + self.encode(prefix, add_special_tokens=False) + [suf]
                        + self.encode(suffix, add_special_tokens=False) + [mid])
        raise ValueError("this model's tokenizer has no fill-in-the-middle tokens (e.g. Qwen2.5-Coder's "
                         "<|fim_prefix|>): suffix needs a code model trained for insertion")

    def _special_vocab(self) -> dict[str, int]:
        if self._fim_vocab is None:
            vocab = self.hf.get_vocab()
            self._fim_vocab = {name: vocab[name] for names in _FIM_TOKENS for name in names if name in vocab}
        return self._fim_vocab

    def encode_pair(self, text: str, text_pair: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's encoding of a text pair (its pair template: separators where the tokenizer has them, else
        the two texts back to back), as a cross-encoder reads a (query, document) pair."""
        return list(self.hf(text, text_pair, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(token_ids)))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        content_format: str = "auto",
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the model's chat template (or the override; or `chat_template`, one call's own).

        content_format (vLLM's chat_template_content_format): how a message's content reaches the template.
        "string": one string (text parts joined by newlines); "openai": a list of {"type": "text", "text": ...}
        parts (a string becomes one part), for templates that loop over the parts; "auto": "openai" where the
        template loops over a message's content, else "string".

        Raises ValueError when the model has no template, a message is malformed, or the template
        itself rejects the conversation (e.g. roles that must alternate).
        """
        chat_template = chat_template if chat_template is not None else self.chat_template
        if isinstance(chat_template, dict):  # named templates (Transformers' form): "tool_use" with tools
            chat_template = chat_template.get("tool_use") if tools and "tool_use" in chat_template \
                else chat_template.get("default")
        if not chat_template:
            raise ValueError(
                "this model has no chat template; pass one with chat_template= (a Jinja file path or "
                "the template text), or use the completions API with a plain prompt"
            )
        if content_format == "auto":
            content_format = detect_content_format(chat_template)
        normalized = normalize_messages(messages, content_format)
        import jinja2  # transformers renders with jinja2; its errors are the user's to fix

        try:
            text = self.hf.apply_chat_template(
                normalized,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                tools=tools,
                **template_kwargs,
            )
        except (jinja2.TemplateError, TypeError) as exc:  # TypeError: e.g. tojson of a field a message lacks
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc
        if not isinstance(text, str):
            raise ValueError("the chat template did not render to text")
        if tokenize:
            # Templates write their own BOS/special tokens; adding them again would double them.
            return self.encode(text, add_special_tokens=False)
        return text


CONTENT_FORMATS = ("auto", "string", "openai")


@functools.lru_cache(maxsize=16)
def detect_content_format(chat_template: str) -> str:
    """"openai" when the template loops over a message's content (`{% for part in message['content'] %}`, as Gemma
    3's), else "string": vLLM's rule for chat_template_content_format "auto". A message is a loop variable over
    `messages` (or over a name set from it, e.g. `loop_messages = messages[1:]`); its content is read directly or
    through a name set from it."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = _template_parser().parse(chat_template)
    except jinja2.TemplateError:
        return "string"

    def base_name(node: nodes.Node) -> str | None:
        """The variable an expression reads from: `messages[1:]`, `messages | reverse`, `loop_messages`."""
        while isinstance(node, (nodes.Getitem, nodes.Filter, nodes.Getattr)) and node.node is not None:
            if isinstance(node, nodes.Getattr) or (isinstance(node, nodes.Getitem)
                                                    and not isinstance(node.arg, nodes.Slice)):
                return None  # an element or attribute, not the list itself
            node = node.node
        return node.name if isinstance(node, nodes.Name) else None

    def content_of(node: nodes.Node, messages_vars: set[str]) -> bool:
        """Whether `node` is `m.content` / `m['content']` of a message variable m (filters around it included)."""
        while isinstance(node, nodes.Filter) and node.node is not None:
            node = node.node
        if isinstance(node, nodes.Getattr) and node.attr == "content":
            target = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content":
            target = node.node
        else:
            return False
        return isinstance(target, nodes.Name) and target.name in messages_vars

    lists = {"messages"}  # names holding the message list
    for assign in tree.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and base_name(assign.node) in lists:
            lists.add(assign.target.name)
    items = set()  # names holding one message
    for loop in tree.find_all(nodes.For):
        if isinstance(loop.target, nodes.Name) and base_name(loop.iter) in lists:
            items.add(loop.target.name)
    contents = set()  # names set from a message's content
    for assign in tree.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and content_of(assign.node, items):
            contents.add(assign.target.name)
    for loop in tree.find_all(nodes.For):
        source = loop.iter
        while isinstance(source, nodes.Filter) and source.node is not None:
            source = source.node
        if content_of(source, items) or (isinstance(source, nodes.Name) and source.name in contents):
            return "openai"
    return "string"


@functools.lru_cache(maxsize=1)
def _template_parser():
    """A jinja2 environment that parses what Transformers' chat templates may hold: loop controls, `do`, and
    Transformers' own `{% generation %}...{% endgeneration %}` block (parsed as its body)."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    return jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do", GenerationTag])


def normalize_messages(messages: Any, content_format: str = "string") -> list[dict[str, Any]]:
    """Validate OpenAI-style messages. content_format "string": list-of-text-parts content joined into one
    string; "openai": content as a list of text parts (a string becomes one)."""
    if content_format not in ("string", "openai"):
        raise ValueError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}; "
                         f"got {content_format!r}")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in _CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(_CHAT_ROLES)}; got {role!r}")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""  # an assistant turn that only made tool calls
        if isinstance(content, list):
            texts: list[str] = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(
                        f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': '...'}}; "
                        "only text content is supported"
                    )
                texts.append(part["text"])
            content = "\n".join(texts) if content_format == "string" else texts  # as vLLM joins text parts
        elif isinstance(content, str) and content_format == "openai":
            texts = [content] if content or role != "assistant" else []
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        if content_format == "openai":
            content = [{"type": "text", "text": text} for text in texts]
        _check_tool_calls(msg.get("tool_calls"), i)
        out.append({**msg, "role": role, "content": content})
    return out


def _check_tool_calls(tool_calls: Any, i: int) -> None:
    """An assistant turn's tool calls, as OpenAI writes them: [{"type": "function", "function": {"name": ...,
    "arguments": "..."}}] (the templates render name and arguments; anything else would fail inside them)."""
    if tool_calls is None:
        return
    if not isinstance(tool_calls, list):
        raise ValueError(f"messages[{i}].tool_calls must be a list")
    for j, call in enumerate(tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise ValueError(f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if not isinstance(function.get("arguments"), (str, dict)):
            raise ValueError(f"{where}.function.arguments must be a JSON string (or an object)")


def _read_chat_template(chat_template: str) -> str:
    """A path to a template file, or the template text itself."""
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    raise ValueError(
        f"chat_template {chat_template!r} is neither an existing file nor Jinja template text"
    )


def _generation_config_eos_ids(folder: str) -> set[int]:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if isinstance(eos, int):
        return {eos}
    if isinstance(eos, list):
        return {int(t) for t in eos if isinstance(t, int)}
    return set()


def load_tokenizer(path_or_dir: str, gguf_file: str | None = None,
                   chat_template: str | None = None) -> Tokenizer:
    """Load from a folder, a hub id, or a GGUF file (a path to `*.gguf`, or folder + gguf_file=)."""
    if gguf_file is None and path_or_dir.endswith(".gguf") and os.path.isfile(path_or_dir):
        path_or_dir, gguf_file = os.path.split(os.path.abspath(path_or_dir))
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    hf = _load_named_fast_tokenizer(path_or_dir) if gguf_file is None else None
    if hf is None:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path_or_dir, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not load a tokenizer from {path_or_dir!r}: {exc}") from exc
    eos_ids = _generation_config_eos_ids(path_or_dir) if os.path.isdir(path_or_dir) else set()
    template = _read_chat_template(chat_template) if chat_template else None
    return Tokenizer(hf, eos_ids, template)


def _load_named_fast_tokenizer(folder: str) -> Any | None:
    """The fast tokenizer class that tokenizer_config.json names, loaded without AutoTokenizer, whose
    imports cost ~8 s more at start-up on some images (transformers 5.17: docs/gpu-notes.md, session 3);
    None (AutoTokenizer then decides) when there is no such file or class, or it is not a fast one."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name or name.startswith("Auto"):
        return None
    import transformers

    for candidate in (name + "Fast", name) if not name.endswith("Fast") else (name,):
        cls = getattr(transformers, candidate, None)
        if cls is None:
            continue
        try:
            tokenizer = cls.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - AutoTokenizer gets its chance (and reports the error)
            return None
        return tokenizer if getattr(tokenizer, "is_fast", False) else None
    return None


class _Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Streams the text of one request's output tokens, cutting at stop strings.

    Text pipeline per add_tokens():
        tokens ─► window decode ─► confirmed text (_all_text) ─► stop search ─► emitted (text)
                  (held while it ends in U+FFFD)                  (holds a possible stop prefix)
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        """min_tokens: stop strings are looked for only once more output tokens than this have come (vLLM's rule: a
        stop string completed within the first min_tokens tokens does not end the request)."""
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens
        self._num_tokens = 0  # output tokens added
        self.skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # For each stop string: last char -> lengths k (descending) with stop[:k] ending in that char;
        # lets the hold check test only the few prefixes that can match the text's last character.
        self._prefix_ends: list[dict[str, list[int]]] = []
        for s in self.stop:
            by_char: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                by_char.setdefault(s[k - 1], []).append(k)
            self._prefix_ends.append(by_char)

        # Window offsets into _token_ids (prompt tail + outputs):
        #   [prefix_offset, read_offset): already turned into text, decoded again as context
        #   [read_offset, len):           not yet confirmed as text
        tail = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._token_ids: list[int] = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)

        self._all_text = ""  # confirmed text of all output tokens, before stop truncation
        self._text = ""  # emitted so far
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The text emitted so far; after flush() or a stop, the final output text."""
        return self._text

    @property
    def finished_by_stop(self) -> bool:
        return self.stop_reason is not None

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append sampled tokens; return the text delta that is now safe to show."""
        if self.finished_by_stop or not new_token_ids:
            return ""
        self._token_ids.extend(new_token_ids)
        self._num_tokens += len(new_token_ids)
        return self._advance(self._decode_pending(final=False))

    def flush(self) -> str:
        """At finish: return everything still held (an incomplete character comes out as U+FFFD)."""
        if self.finished_by_stop:
            return ""
        delta = self._advance(self._decode_pending(final=True))
        if self.finished_by_stop:
            return delta
        rest = self._all_text[len(self._text):]
        self._text += rest
        return delta + rest

    def _decode_pending(self, final: bool) -> str:
        if self._read_offset >= len(self._token_ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self._token_ids[self._prefix_offset:self._read_offset],
                             skip_special_tokens=self.skip_special_tokens)
        new_text = decode(self._token_ids[self._prefix_offset:],
                          skip_special_tokens=self.skip_special_tokens)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # incomplete character (or nothing visible yet): wait for more tokens
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        # Tokens before prefix_offset are never decoded again; dropping them keeps memory and the
        # list bounded for long outputs.
        del self._token_ids[:self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return delta

    def _advance(self, new_text: str) -> str:
        """Add confirmed text, look for stop strings, and emit what can no longer change."""
        if new_text:
            prev_len = len(self._all_text)
            self._all_text += new_text
            if self.stop and self._num_tokens > self.min_tokens and self._find_stop(prev_len):
                delta = self._all_text[len(self._text):]
                self._text = self._all_text
                return delta
        safe_end = len(self._all_text) - self._held_suffix_len()
        if safe_end <= len(self._text):
            return ""
        delta = self._all_text[len(self._text):safe_end]
        self._text += delta
        return delta

    def _find_stop(self, prev_len: int) -> bool:
        """Search only where a stop string could end in the new text; truncate _all_text if found."""
        start = max(0, prev_len - self._max_stop_len + 1)
        # The stop that completes first wins (smallest end; on a tie the longer one), so the result
        # depends only on the text, not on how it was split into tokens or decode chunks.
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = self._all_text.find(s, start)
            if i != -1 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            return False
        _, i, s = best
        end = i + len(s) if self.include_stop_str_in_output else i
        self._all_text = self._all_text[:end]
        self.stop_reason = s
        return True

    def _held_suffix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string.

        With include_stop_str_in_output nothing needs holding: text up to and including a stop
        string is shown anyway, and a stop is always found before its end is emitted.
        """
        if not self.stop or self.include_stop_str_in_output or not self._all_text:
            return 0
        text = self._all_text
        best = 0
        for s, by_char in zip(self.stop, self._prefix_ends):
            for k in by_char.get(text[-1], ()):
                if k <= best:
                    break
                if k <= len(text) and text.endswith(s[:k]):
                    best = k
                    break
        # Emitted text never shrinks; the hold only covers text not yet shown.
        return min(best, len(text) - len(self._text))
