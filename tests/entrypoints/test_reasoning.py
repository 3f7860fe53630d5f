"""Reasoning parsers (entrypoints/openai/reasoning.py): whole answers, and the same answers cut into every
kind of delta (tags split across deltas) give the same reasoning and content."""

from __future__ import annotations

import random

import pytest

from pagedserve.entrypoints.openai.reasoning import ReasoningStream, split

CASES = [
    # (parser, answer, reasoning, content)
    ("qwen3", "<think>\nsum 2 and 2\n</think>\n\nIt is 4.", "\nsum 2 and 2\n", "It is 4."),
    ("qwen3", "It is 4.", None, "It is 4."),  # thinking off: all content
    ("qwen3", "<think>still thinking when cut", "still thinking when cut", None),
    ("qwen3", "<think></think>\n\n", None, None),
    ("qwen3", "<thi", None, "<thi"),  # a cut tag at the end is text
    ("qwen3", "I think </think> is a tag", None, "I think </think> is a tag"),  # no opening tag: content
    ("deepseek_r1", "plan it</think>\n\nAnswer: 4", "plan it", "Answer: 4"),
    ("deepseek_r1", "<think>plan</think>Answer", "plan", "Answer"),
    ("deepseek_r1", "cut in the middle of thought", "cut in the middle of thought", None),
    ("deepseek_r1", "a </thin", "a </thin", None),
    ("deepseek_r1", "x</think>\n\n</think>y", "x", "</think>y"),  # only the first end tag closes
    # gpt-oss's harmony messages (the special tokens kept): analysis is reasoning, final content, markup dropped
    ("gpt_oss", "<|channel|>analysis<|message|>User asks 2+2. Answer 4.<|end|><|start|>assistant<|channel|>final"
                "<|message|>It is 4.", "User asks 2+2. Answer 4.", "It is 4."),
    ("gpt_oss", "<|channel|>analysis<|message|>a<b and <|x|> stays<|end|><|start|>assistant<|channel|>final "
                "<|message|>ok<|return|>", "a<b and <|x|> stays", "ok"),
    ("gpt_oss", "<|channel|>final<|message|>Just this.", None, "Just this."),  # no analysis (low effort)
    ("gpt_oss", "Plain text, no markup", None, "Plain text, no markup"),  # the template opened the final channel
    ("gpt_oss", "<|channel|>analysis<|message|>cut while thin", "cut while thin", None),
    ("gpt_oss", "<|channel|>analysis<|message|>x<|en", "x<|en", None),  # a cut end tag at the end is text
    ("gpt_oss", "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|chan", "x", None),  # cut header: dropped
    ("gpt_oss", "<|channel|>commentary<|message|>Checking.<|end|>", None, "Checking."),  # a preamble: content
    # a call: a hermes-style block for the tool parser (the recipient before or after the channel)
    ("gpt_oss", "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>commentary to=functions.f "
                "<|constrain|>json<|message|>{\"a\": 1}<|call|>", "think",
     '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'),
    ("gpt_oss", "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>", None,
     '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'),
    # <|call|> is a stop token, so the answer usually ends without it: the block is closed at the end
    ("gpt_oss", '<|channel|>commentary to=functions.f<|message|>{"x": [1, 2]}', None,
     '<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}</tool_call>'),
]


@pytest.mark.parametrize("kind, text, reasoning, content", CASES)
def test_split_and_every_chunking_of_the_stream_agree(kind: str, text: str, reasoning, content) -> None:
    assert split(kind, text) == (reasoning, content)
    rng = random.Random(len(text))
    for _ in range(40):
        stream, pieces, i = ReasoningStream(kind), [], 0
        while i < len(text):
            j = min(len(text), i + rng.randint(1, 4))
            pieces += stream.feed(text[i:j])
            i = j
        pieces += stream.finish()
        assert all(t for _, t in pieces)  # no empty deltas
        got_r = "".join(t for k, t in pieces if k == "reasoning") or None
        got_c = "".join(t for k, t in pieces if k == "content") or None
        assert (got_r, got_c) == (reasoning, content)
        kinds = [k for k, _ in pieces]
        assert kinds == sorted(kinds, key=lambda k: k == "content")  # reasoning never after content


def test_reasoning_streams_before_the_end_tag_arrives() -> None:
    stream = ReasoningStream("qwen3")
    assert stream.feed("<think>abc") == [("reasoning", "abc")]
    assert stream.feed("de</th") == [("reasoning", "de")]  # "</th" held: maybe the tag
    assert stream.feed("ink>\n") == []
    assert stream.feed("\nok") == [("content", "ok")]


def test_harmony_reasoning_streams_before_its_message_ends() -> None:
    stream = ReasoningStream("openai_gptoss")  # vLLM's name
    assert stream.feed("<|channel|>analysis<|mess") == []  # the header is cut
    assert stream.feed("age|>abc<|") == [("reasoning", "abc")]  # "<|" held: maybe a tag
    assert stream.feed("end|><|start|>assistant<|channel|>final<|message|>4") == [("content", "4")]


def test_the_chat_route_keeps_special_tokens_for_the_harmony_parser() -> None:
    from pagedserve.entrypoints.openai.reasoning import KEEPS_SPECIAL_TOKENS, PARSERS

    assert "gpt_oss" in PARSERS and KEEPS_SPECIAL_TOKENS == ("gpt_oss",)


def test_unknown_parser_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="qwen3, deepseek_r1, gpt_oss"):
        ReasoningStream("granite")
