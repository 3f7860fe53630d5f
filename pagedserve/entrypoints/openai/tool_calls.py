"""Tool calling for chat: OpenAI's `tools` and `tool_choice`, in four modes.

    tool_choice        how the model's answer is produced          what the client gets
    "none"             free text (the tools are in the prompt)     content
    {"function": f}    JSON held to f's parameters schema          one tool call to f (its arguments)
    "required"         a JSON array of {"name", "parameters"}      those tool calls (one at least)
                       held to the tools' schemas
    "auto"             free text, parsed (hermes format)           tool calls and/or content

The named and required modes are structured outputs (pagedserve/structured_output.py), so their calls
always parse and always match a schema. Auto needs `--enable-auto-tool-choice`; its parser reads the
hermes format that Qwen2/2.5 chat templates ask for, `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>` blocks, and answers that are nothing but calls: one JSON object naming a tool of the request, a list of
them, or several separated by ';' (Llama 3.1's `{"name": ..., "parameters": {...}}`, after its `<|python_tag|>` when
special tokens are kept; Mistral's `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`), which also covers small models
that drop the hermes tags. Inside a `<tool_call>` block it also reads Qwen3-Coder's XML form,
`<function=NAME><parameter=ARG>value</parameter>...</function>`, each value converted by the type its tool's
parameters schema gives it (a string stays as written). An answer that is nothing but a Python list of calls, Llama
3.2's and Llama 4's "pythonic" form `[get_weather(city="Oslo"), get_time(zone="CET")]` (keyword arguments with literal
values), is read too. `--tool-call-parser` hermes, llama3_json, mistral, qwen3_coder and pythonic all name this one
parser.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# What may open an answer of bare calls: Llama 3.1's tag for them, Mistral's (with skip_special_tokens=false).
CALL_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "qwen3_coder", "pythonic")
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128


@dataclass(slots=True)
class ToolMode:
    kind: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    # every function of the request, with its parameters schema (the XML call form converts values by it)
    names: dict[str, dict] = field(default_factory=dict)
    parallel: bool = True  # parallel_tool_calls: false -> at most one call


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_dict(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    if index is not None:
        call["index"] = index  # streamed deltas carry the call's index
    return call


def check_tools(tools: list[Any]) -> list[dict]:
    """The request's tools in OpenAI's shape, checked; ValueError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.'; got {name!r}")
        if name in seen:
            raise ValueError(f"tools[{i}]: the function name {name!r} is used twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": fn})
    return out


def resolve_mode(tools: list[dict] | None, tool_choice: Any, auto_enabled: bool,
                 parallel_tool_calls: bool | None = None) -> ToolMode:
    """The request's tool mode; ValueError for a choice that cannot be served."""
    mode = _resolve_kind(tools, tool_choice, auto_enabled)
    mode.parallel = parallel_tool_calls is not False
    return mode


def _resolve_kind(tools: list[dict] | None, tool_choice: Any, auto_enabled: bool) -> ToolMode:
    names = {t["function"]["name"]: _parameters(t["function"]) for t in tools or []}
    if tool_choice is None:
        if not tools:
            return ToolMode("none", names=names)
        tool_choice = "auto"  # OpenAI's default with tools, and vLLM's (so also its 400 without the flag)
    if tool_choice == "none":
        return ToolMode("none", names=names)
    if not tools:
        raise ValueError("tool_choice needs tools")
    if tool_choice == "auto":
        if not auto_enabled:
            raise ValueError('"auto" tool choice (the default when tools are given) needs the server started with '
                             '--enable-auto-tool-choice; or pass tool_choice "none", "required" or a function')
        return ToolMode("auto", names=names)
    if tool_choice == "required":
        return ToolMode("required", names=names)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
        return ToolMode("named", name=name, names=names)
    raise ValueError(f'tool_choice must be "none", "auto", "required" or a function; got {tool_choice!r}')


def _parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def structured_outputs_for(mode: ToolMode, tools: list[dict]) -> dict | None:
    """The structured-output constraint that produces the calls of a named or required choice."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if mode.kind == "named":
        return {"json": _parameters(by_name[mode.name])}
    if mode.kind == "required":
        options = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": _parameters(fn)},
                    "required": ["name", "parameters"], "additionalProperties": False}
                   for name, fn in by_name.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if not mode.parallel:
            schema["maxItems"] = 1
        return {"json": schema}
    return None


def calls_from_required(text: str) -> list[dict] | None:
    """A required choice's JSON array as tool calls; None when it does not parse (cut by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    return [call_dict(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items
            if isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item]


def _as_call(obj: Any, names: list[str] | dict[str, dict]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return call_dict(obj["name"], json.dumps(args, ensure_ascii=False))


def _block_call(block: str, names: list[str] | dict[str, dict]) -> dict | None:
    """The call a <tool_call> block's text holds (JSON, or Qwen3-Coder's XML form); None when it is neither, naming
    one of the tools."""
    try:
        return _as_call(json.loads(block.strip()), names)
    except ValueError:
        return _xml_call(block, names)


def _xml_call(block: str, names: list[str] | dict[str, dict]) -> dict | None:
    """Qwen3-Coder's `<function=NAME>` with `<parameter=ARG>value</parameter>` children (one newline around a value
    dropped), each value converted by its parameter's schema type: strings as written, numbers, booleans, null,
    objects and arrays from JSON (a value that does not parse as its type stays a string)."""
    match = _XML_FUNCTION.search(block)
    if match is None or match.group(1).strip() not in names:
        return None
    name = match.group(1).strip()
    schema = names.get(name) if isinstance(names, dict) else None
    properties = (schema or {}).get("properties") or {}
    args: dict[str, Any] = {}
    for param in _XML_PARAMETER.finditer(match.group(2)):
        key, raw = param.group(1).strip(), param.group(2)
        raw = raw[1:] if raw.startswith("\n") else raw
        raw = raw[:-1] if raw.endswith("\n") else raw
        args[key] = _typed(raw, (properties.get(key) or {}).get("type"))
    return call_dict(name, json.dumps(args, ensure_ascii=False))


def _typed(raw: str, kind: Any) -> Any:
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None or "string" in kinds:
        return raw
    try:
        value = json.loads(raw.strip())
    except ValueError:
        return raw
    if "integer" in kinds and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def parse_hermes(text: str, names: list[str] | dict[str, dict]) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole answer in auto mode."""
    calls: list[dict] = []
    if TOOL_CALL_START in text:
        content = text.split(TOOL_CALL_START, 1)[0]
        for block in re.findall(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|$)", text,
                                flags=re.DOTALL):
            call = _block_call(block, names)
            if call is None:  # a block that is not a call to one of the tools: the answer stays text
                return text, []
            calls.append(call)
        return (content.strip() or None), calls
    bare = _bare_calls(text, names)
    if bare:
        return None, bare
    return text, []


def _bare_calls(text: str, names: list[str] | dict[str, dict]) -> list[dict] | None:
    """The calls an answer made of nothing else holds (a call prefix, then JSON objects or lists of them, ';' or
    whitespace between); None when any part is not a call to one of the tools."""
    stripped = text.strip()
    for prefix in CALL_PREFIXES:
        if stripped.startswith(prefix):
            stripped = stripped[len(prefix):].lstrip()
            break
    if not stripped.startswith(("{", "[")):
        return None
    if stripped.startswith("[") and not stripped.startswith(("[{", "[ {", "[\n")):
        pythonic = _pythonic_calls(stripped, names)
        if pythonic is not None:
            return pythonic
    decoder, objs, pos = json.JSONDecoder(), [], 0
    while pos < len(stripped):
        try:
            obj, pos = decoder.raw_decode(stripped, pos)
        except ValueError:
            return None
        objs.extend(obj if isinstance(obj, list) else [obj])
        while pos < len(stripped) and stripped[pos] in " \t\r\n;":
            pos += 1
    calls = [_as_call(o, names) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return calls


def _pythonic_calls(text: str, names: list[str] | dict[str, dict]) -> list[dict] | None:
    """`[f(a=1, b="x"), g()]` (Llama 3.2 / 4's pythonic tool calls) as calls; None unless the text is exactly a list
    of calls to the request's tools with keyword arguments whose values are literals (strings, numbers, booleans,
    None, and lists / dicts of them)."""
    import ast

    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args \
                or node.func.id not in names or any(k.arg is None for k in node.keywords):
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            return None
        calls.append(call_dict(node.func.id, json.dumps(args, ensure_ascii=False)))
    return calls


class AutoToolStream:
    """Auto mode while streaming: text deltas in, (content delta, finished calls) out.

    Content streams as it comes, except a tail that could be the start of `<tool_call>`, held back until
    it is known. Once a block opens, its text is held until the block closes, and then goes out as one
    tool call (name and whole arguments in one delta, which OpenAI clients accumulate like any other). An
    answer that starts with '{' or '[' is held to the end, in case it is a bare call (see parse_hermes)."""

    def __init__(self, names: list[str] | dict[str, dict]) -> None:
        self.names = names
        self.pending = ""  # text not yet sent as content nor parsed as calls
        self.in_block = False
        self.bare = None  # None: not yet known whether the answer may be a bare JSON call
        self.num_calls = 0
        self.sent_content = False

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.pending += delta
        if self.bare is None:
            head = self.pending.lstrip()
            if not head or any(len(head) < len(p) and p.startswith(head) for p in CALL_PREFIXES):
                return "", []  # not yet known (nothing, or what may be the start of a call prefix)
            self.bare = head[0] in "{[" or head.startswith(CALL_PREFIXES)
        if self.bare:
            return "", []
        content, calls = "", []
        while True:
            if self.in_block:
                end = self.pending.find(TOOL_CALL_END)
                if end < 0:
                    break
                block, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_END):]
                self.in_block = False
                call = self._call(block)
                if call is not None:
                    calls.append(call)
                else:  # not a call to one of the tools: the block goes out as written
                    content += TOOL_CALL_START + block + TOOL_CALL_END
                continue
            start = self.pending.find(TOOL_CALL_START)
            if start >= 0:
                content += self.pending[:start]
                self.pending = self.pending[start + len(TOOL_CALL_START):]
                self.in_block = True
                continue
            keep = _partial_suffix(self.pending, TOOL_CALL_START)
            content += self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
            break
        if self.num_calls and not content.strip():
            content = ""  # whitespace between calls is not content
        self.sent_content = self.sent_content or bool(content)
        return content, calls

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: what is still held."""
        text, self.pending = self.pending, ""
        if self.bare:
            calls = _bare_calls(text, self.names)
            if calls:
                for i, call in enumerate(calls):
                    call["index"] = self.num_calls + i
                self.num_calls += len(calls)
                return "", calls
            return text, []
        if self.in_block:  # cut before its end tag (max_tokens): a call if it parses, else text
            call = self._call(text)
            return ("", [call]) if call is not None else (TOOL_CALL_START + text, [])
        return text, []

    def _call(self, block: str) -> dict | None:
        call = _block_call(block, self.names)
        if call is not None:
            call["index"] = self.num_calls
            self.num_calls += 1
        return call


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as chat templates expect them: arguments as objects, not JSON strings. (Malformed calls
    are left as they are: tokenizer.normalize_messages refuses them with the reason.)"""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict):
                    fixed.append(c)
                    continue
                fn = dict(fn)
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
