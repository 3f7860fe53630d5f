"""Reasoning parsers (`--reasoning-parser`, as vLLM's): a thinking model's answer split into
`reasoning_content` (its thoughts, between `<think>` and `</think>`) and `content` (what follows).

    qwen3        Qwen3: the answer opens with "<think>" when the model thinks; without it (enable_thinking
                 false: the template wrote an empty think block into the prompt) everything is content.
    deepseek_r1  DeepSeek-R1 and models whose template opens the think block in the prompt: the answer
                 starts inside the reasoning (a leading "<think>" is dropped) and everything up to
                 "</think>" is reasoning, all of it when "</think>" never comes (the answer was cut).

    gpt_oss      gpt-oss's harmony format (vLLM's "openai_gptoss"; read with the special tokens kept, which the
                 chat route asks for): messages "<|channel|>NAME<|message|>TEXT" ended by <|end|>, <|return|> or
                 <|call|>, the next one opened by "<|start|>assistant"; the analysis channel's text is reasoning,
                 the final (and commentary) channels' content; the markup itself is dropped. A message to a
                 function ("to=functions.NAME" in its header, its body the JSON arguments, ended by <|call|>)
                 becomes a `<tool_call>{"name": NAME, "arguments": BODY}</tool_call>` block in the content, which
                 the auto tool choice reads as any hermes-style call (--enable-auto-tool-choice).

The newlines a model writes between "</think>" and its answer are dropped. `split` (whole answers) and
`ReasoningStream` (deltas; the tags may arrive cut across deltas) give the same two texts.
"""

from __future__ import annotations

import re

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1", "gpt_oss")
ALIASES = {"openai_gptoss": "gpt_oss"}  # vLLM's name
# Parsers that read the answer's special tokens (the chat route decodes with skip_special_tokens false).
KEEPS_SPECIAL_TOKENS = ("gpt_oss",)
_HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")
_HARMONY_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_HARMONY_RECIPIENT = re.compile(r"\bto=functions\.([A-Za-z0-9_.\-]+)")


def split(kind: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer; None for an empty part."""
    stream = ReasoningStream(kind)
    pieces = stream.feed(text) + stream.finish()
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    return reasoning or None, content or None


class ReasoningStream:
    """Text deltas in, ("reasoning" | "content", text) pieces out, in order."""

    def __init__(self, kind: str) -> None:
        kind = ALIASES.get(kind, kind)
        if kind not in PARSERS:
            raise ValueError(f"unknown reasoning parser {kind!r}; choose from {', '.join(PARSERS)}")
        self.kind = kind
        # think tags: start -> reasoning -> after (newlines before the answer) -> content;
        # harmony: header (up to <|message|>) -> body (its channel's kind, up to a message's end) -> header ...
        self.state = "header" if kind == "gpt_oss" else "start"
        self.body_kind = "content"
        self.body_close = ""  # what ends the body's piece (a function call's closing tag)
        self.held = ""  # text not yet given out: a tag may be cut across deltas

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.held += delta
        out: list[tuple[str, str]] = []
        if self.kind == "gpt_oss":
            return self._feed_harmony(out)
        while True:
            if self.state == "start":
                if self.held.startswith(START):
                    self.held = self.held[len(START):]
                    self.state = "reasoning"
                elif START.startswith(self.held):
                    return out  # "" or a cut "<thi": wait for more
                else:
                    self.state = "reasoning" if self.kind == "deepseek_r1" else "content"
            elif self.state == "reasoning":
                end = self.held.find(END)
                if end < 0:
                    keep = _tag_prefix_len(self.held, END)
                    _put(out, "reasoning", self.held[:len(self.held) - keep])
                    self.held = self.held[len(self.held) - keep:]
                    return out
                _put(out, "reasoning", self.held[:end])
                self.held = self.held[end + len(END):]
                self.state = "after"
            elif self.state == "after":
                stripped = self.held.lstrip("\n")
                if not stripped:
                    self.held = ""
                    return out
                self.held = stripped
                self.state = "content"
            else:
                _put(out, "content", self.held)
                self.held = ""
                return out

    def _feed_harmony(self, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
        while self.held:
            if self.state == "header":
                if not self.held.startswith("<|") and not "<|".startswith(self.held):
                    self.state, self.body_kind = "body", "content"  # no markup: an answer as plain text
                    continue
                opened = self.held.find("<|message|>")
                if opened < 0:
                    return out  # the header is cut: wait for more
                header = self.held[:opened]
                channel = _HARMONY_CHANNEL.search(header)
                recipient = _HARMONY_RECIPIENT.search(header)
                self.body_kind = "reasoning" if channel is not None and channel.group(1) == "analysis" else "content"
                self.body_close = ""
                if recipient is not None:  # a function call: its arguments as a hermes-style block
                    self.body_kind, self.body_close = "content", "}</tool_call>"
                    _put(out, "content", f'<tool_call>{{"name": "{recipient.group(1)}", "arguments": ')
                self.held = self.held[opened + len("<|message|>"):]
                self.state = "body"
            else:
                ends = [(i, tag) for tag in _HARMONY_ENDS if (i := self.held.find(tag)) >= 0]
                if not ends:
                    keep = max(_tag_prefix_len(self.held, tag) for tag in _HARMONY_ENDS)
                    _put(out, self.body_kind, self.held[:len(self.held) - keep])
                    self.held = self.held[len(self.held) - keep:]
                    return out
                end, tag = min(ends)
                _put(out, self.body_kind, self.held[:end] + self.body_close)
                # <|start|> opens the next message's header; the other tags end this one (a header follows)
                self.held = self.held[end:] if tag == "<|start|>" else self.held[end + len(tag):]
                self.state = "header"
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held once the answer ends (a cut tag is then plain text)."""
        held, self.held = self.held, ""
        if self.kind == "gpt_oss":  # a cut header is dropped; a body's cut tag is its text. A call's body is closed:
            # the answer stops at <|call|>, a stop token that is not in the text.
            if self.state != "body" or not (held or self.body_close):
                return []
            return [(self.body_kind, held + self.body_close)]
        if not held or self.state == "after":
            return []
        if self.state == "start":
            return [("reasoning" if self.kind == "deepseek_r1" else "content", held)]
        return [("reasoning" if self.state == "reasoning" else "content", held)]


def _put(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        out.append((kind, text))


def _tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (it may be the tag, cut)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
