"""Tokenizer wrapper, chat templates and the incremental detokenizer.

The first half needs no model files (a fake byte-level tokenizer); the second half uses the real
Qwen tokenizer of the embedded default model (the real_model_dir fixture).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import pytest

from pagedserve.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    detect_content_format,
    load_tokenizer,
    normalize_messages,
)

# ---------------------------------------------------------------- fake byte-level tokenizer


class ByteTokenizer:
    """Each id is a chunk of UTF-8 bytes (so tokens can split characters, as byte-level BPE does)."""

    SPECIAL = "<eos>"

    def __init__(self) -> None:
        self.pieces: list[bytes] = [self.SPECIAL.encode()]

    def tokenize(self, text: str, rng: random.Random, max_len: int = 4) -> list[int]:
        data = text.encode()
        ids, i = [], 0
        while i < len(data):
            n = rng.randint(1, max_len)
            self.pieces.append(data[i:i + n])
            ids.append(len(self.pieces) - 1)
            i += n
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        chunks = [self.pieces[t] for t in token_ids if not (skip_special_tokens and t == 0)]
        return b"".join(chunks).decode("utf-8", errors="replace")


def stream(det: IncrementalDetokenizer, ids: Sequence[int], step: int = 1) -> list[str]:
    deltas = [det.add_tokens(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(det.flush())
    return deltas


def expected_stop_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: the first stop string to complete (on a tie, the longer one) ends the text."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[:end - len(s)]), s
    return text, None


def test_utf8_split_across_tokens_is_held_until_complete() -> None:
    tok = ByteTokenizer()
    text = "a你好🎉b"
    ids = tok.tokenize(text, random.Random(0), max_len=1)  # one byte per token
    det = IncrementalDetokenizer(tok, prompt_token_ids=[])
    deltas = stream(det, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert [d for d in deltas if d] == ["a", "你", "好", "🎉", "b"]
    assert "".join(deltas) == det.text == text


def test_incomplete_character_at_finish_is_flushed_as_replacement() -> None:
    tok = ByteTokenizer()
    ids = tok.tokenize("x你", random.Random(0), max_len=1)[:-1]  # drop the last byte of 你
    det = IncrementalDetokenizer(tok, [])
    deltas = stream(det, ids)
    assert deltas[-1].endswith("\ufffd") and "".join(deltas) == det.text == tok.decode(ids)


def test_stop_prefix_is_held_then_released_or_cut() -> None:
    tok = ByteTokenizer()
    tok.pieces += [b"abc", b"xS", b"T", b"x", b"STO", b"P!"]  # ids 1..6
    det = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert det.add_tokens([1]) == "abc"  # nothing here can start "STOP"
    assert det.add_tokens([2]) == "x"  # "S" held
    assert det.add_tokens([3]) == ""  # "ST" held
    assert det.add_tokens([4]) == "STx"  # "STx" can't start "STOP": released
    assert det.add_tokens([5]) == ""  # "STO" held
    assert det.add_tokens([6]) == ""  # "STOP!" -> cut before the stop
    assert det.finished_by_stop and det.stop_reason == "STOP"
    assert det.text == "abcxSTx" and det.flush() == "" and det.add_tokens([1]) == ""


def test_held_stop_prefix_is_flushed_at_finish() -> None:
    tok = ByteTokenizer()
    tok.pieces += [b"hello ST"]
    det = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert det.add_tokens([1]) == "hello "
    assert det.flush() == "ST"
    assert det.text == "hello ST" and not det.finished_by_stop


def test_include_stop_str_cuts_after_the_stop_and_holds_nothing() -> None:
    tok = ByteTokenizer()
    tok.pieces += [b"one S", b"TOP two"]
    det = IncrementalDetokenizer(tok, [], stop=["STOP"], include_stop_str_in_output=True)
    assert det.add_tokens([1]) == "one S"
    assert det.add_tokens([2]) == "TOP"
    assert det.text == "one STOP" and det.stop_reason == "STOP"


def test_stop_strings_wait_for_min_tokens() -> None:
    """vLLM's rule (found by stress-testing: min_tokens held back stop tokens only): a stop string completed within
    the first min_tokens output tokens does not end the request; one completed after them does."""
    tok = ByteTokenizer()
    tok.pieces += [b"a\n", b"b", b"c\n", b"d"]  # ids 1..4
    det = IncrementalDetokenizer(tok, [], stop=["\n"], min_tokens=2)
    assert det.add_tokens([1]) == "a\n" and det.stop_reason is None  # token 1 of at least 2
    assert det.add_tokens([2]) == "b"
    det.add_tokens([3])  # the third token: stop strings count now
    assert det.stop_reason == "\n" and det.text == "a\nbc"
    plain = IncrementalDetokenizer(tok, [], stop=["\n"])
    plain.add_tokens([1])
    assert plain.stop_reason == "\n" and plain.text == "a"


def test_first_completed_stop_wins() -> None:
    tok = ByteTokenizer()
    tok.pieces += [b"xABCDy"]
    det = IncrementalDetokenizer(tok, [], stop=["ABCD", "BC"])
    det.add_tokens([1])
    assert det.stop_reason == "BC" and det.text == "xA"


def test_special_tokens_skipped_or_kept() -> None:
    tok = ByteTokenizer()
    tok.pieces += [b"hi"]
    skip = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(stream(skip, [1, 0])) == "hi"
    assert "".join(stream(keep, [1, 0])) == "hi<eos>"


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = ["a", "b", "S", "T", "O", "P", "#", "\n", "你", "🎉", "é"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stops = rng.sample(["STOP", "##", "\n\n", "S你", "🎉🎉", "T", "aSTa"], rng.randint(0, 3))
    include = rng.random() < 0.3
    tok = ByteTokenizer()
    ids = tok.tokenize(text, rng)
    det = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
    want_text, want_reason = expected_stop_cut(text, stops, include)
    deltas = stream(det, ids, step=rng.randint(1, 3))
    assert "".join(deltas) == det.text == want_text
    assert det.stop_reason == want_reason
    assert all("\ufffd" not in d for d in deltas)


def test_normalize_messages_joins_parts_and_rejects_bad_input() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]
    assert [m["content"] for m in normalize_messages(msgs)] == ["be brief", "a\nb", ""]
    bad = [
        [],
        "hi",
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": 5}],
        [{"role": "assistant", "content": None, "tool_calls": {"function": {"name": "f", "arguments": "{}"}}}],
        [{"role": "assistant", "content": None, "tool_calls": [{}]}],
        [{"role": "assistant", "content": None,
          "tool_calls": [{"type": "x", "function": {"name": "f", "arguments": "{}"}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}],
    ]
    for b in bad:
        with pytest.raises(ValueError):
            normalize_messages(b)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    assert normalize_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])[0]["tool_calls"] == [call]


def test_content_format_openai_gives_the_template_text_parts() -> None:
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}, {"role": "assistant", "content": ""}]
    assert [m["content"] for m in normalize_messages(msgs, "openai")] == [
        [{"type": "text", "text": "be brief"}], [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], [], []]
    with pytest.raises(ValueError, match="chat_template_content_format"):
        normalize_messages(msgs, "list")


PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] | selectattr('type', 'equalto', "
                  "'text') %}[{{ p['text'] }}]{% endfor %}{% endfor %}")


def test_content_format_auto_follows_whether_the_template_loops_over_content(qwen: Tokenizer) -> None:
    """vLLM's "auto": a template that loops over a message's content gets a list of parts, any other one a
    string; "string" / "openai" force either."""
    assert detect_content_format(qwen.chat_template) == "string"
    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    assert detect_content_format("{% for m in messages %}{% for c in m['content'] %}{% break %}{% endfor %}"
                                 "{% endfor %}") == "openai"
    assert detect_content_format("{% set loop_messages = messages[1:] %}{% for message in loop_messages %}{% for x "
                                 "in message.content | selectattr('type') %}{% endfor %}{% endfor %}") == "openai"
    assert detect_content_format("{% for m in messages %}{% set c = m.content %}{% for p in c %}{% endfor %}"
                                 "{% endfor %}") == "openai"  # through a name set from the content
    # Transformers' {% generation %} block is parsed (its body counts)
    assert detect_content_format("{% for m in messages %}{% generation %}{% for p in m['content'] %}{{ p.text }}"
                                 "{% endfor %}{% endgeneration %}{% endfor %}") == "openai"
    assert detect_content_format("{% for m in messages %}{{ m['content'] }}{% endfor %}") == "string"
    # loops over something else's content are not a message's (vLLM's rule)
    assert detect_content_format("{% for d in documents %}{% for c in d.content %}{% endfor %}{% endfor %}"
                                 "{% for m in messages %}{{ m.content }}{% endfor %}") == "string"
    assert detect_content_format("{% for x in message.content %}{{ x.text }}{% endfor %}") == "string"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"}]
    parts = Tokenizer(qwen.hf, set(), PARTS_TEMPLATE)
    assert parts.apply_chat_template(msgs, add_generation_prompt=False) == "<user>[a][b]<assistant>[c]"
    assert parts.apply_chat_template(msgs, add_generation_prompt=False, content_format="string") == "<user><assistant>"
    joined = qwen.apply_chat_template(msgs, add_generation_prompt=False)
    assert "a\nb" in joined and joined == qwen.apply_chat_template(msgs, add_generation_prompt=False,
                                                                   content_format="string")
    with pytest.raises(ValueError, match="content_format"):
        qwen.apply_chat_template(msgs, content_format="parts")
    # Named templates (Transformers' dict form): "tool_use" when tools are given, else "default"
    named = Tokenizer(qwen.hf, set(), {"default": "plain:{{ messages[0]['content'] }}",
                                       "tool_use": "tools:{{ tools | length }}"})
    assert named.apply_chat_template(msgs[:1], add_generation_prompt=False) == "plain:a\nb"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert named.apply_chat_template(msgs[:1], add_generation_prompt=False, tools=[tool]) == "tools:1"


def test_a_template_that_fails_on_a_message_is_a_value_error(qwen: Tokenizer) -> None:
    """A template's own TypeError (Qwen's tojson of a field a message lacks: found by the server's fuzz test)
    is the request's fault, not the server's."""
    strict = Tokenizer(qwen.hf, set(), "{% for m in messages %}{{ m.name | tojson }}{% endfor %}")
    assert strict.apply_chat_template([{"role": "user", "content": "hi", "name": "ann"}]) == '"ann"'
    with pytest.raises(ValueError, match="chat template rejected"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


class _NoTemplateHF:
    eos_token_id = 2
    chat_template = None
    all_special_ids = [2]


def test_no_chat_template_is_a_clear_value_error() -> None:
    tok = Tokenizer(_NoTemplateHF())
    assert tok.eos_token_ids == {2}
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- real Qwen tokenizer



@pytest.fixture(scope="module")
def qwen(real_model_dir: str) -> Tokenizer:
    return load_tokenizer(real_model_dir)


def test_qwen_basic_properties(qwen: Tokenizer) -> None:
    assert qwen.eos_token_id == 151645  # <|im_end|>
    assert 151645 in qwen.eos_token_ids
    assert qwen.vocab_size == len(qwen.hf)
    assert qwen.decode(qwen.encode("hello world")) == "hello world"


def test_qwen_streaming_chinese_and_emoji(qwen: Tokenizer) -> None:
    text = "你好，世界！🎉 Family: 👨‍👩‍👧 — naïve café, 東京タワー 🗼🚀 done."
    prompt = qwen.encode("Say something:")
    ids = qwen.encode(text, add_special_tokens=False)
    # The case is only meaningful if some tokens split a character.
    assert any("\ufffd" in qwen.decode([t]) for t in ids)
    det = IncrementalDetokenizer(qwen, prompt)
    deltas = stream(det, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == det.text == qwen.decode(ids) == text


def test_qwen_eos_is_skipped(qwen: Tokenizer) -> None:
    ids = qwen.encode("Done.", add_special_tokens=False) + [qwen.eos_token_id]
    det = IncrementalDetokenizer(qwen, [])
    assert "".join(stream(det, ids)) == "Done."


def test_qwen_stop_string_split_across_tokens(qwen: Tokenizer) -> None:
    text = "The answer is forty-two, and that is final."
    ids = qwen.encode(text, add_special_tokens=False)
    stop = "swer is fo"  # starts and ends inside tokens
    assert not any(stop in qwen.decode([t]) for t in ids)
    for include, want in ((False, "The an"), (True, "The answer is fo")):
        det = IncrementalDetokenizer(qwen, [], stop=[stop], include_stop_str_in_output=include)
        deltas = stream(det, ids)
        assert det.finished_by_stop and det.stop_reason == stop
        assert "".join(deltas) == det.text == want
        # No streamed prefix ever showed part of the stop string beyond the final text.
        shown = ""
        for d in deltas:
            shown += d
            assert want.startswith(shown)


def test_qwen_multiple_stop_strings(qwen: Tokenizer) -> None:
    text = "alpha beta\n\ngamma END delta"
    ids = qwen.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(qwen, [], stop=["END", "\n\n", "zeta"])
    deltas = stream(det, ids)
    assert det.stop_reason == "\n\n" and "".join(deltas) == det.text == "alpha beta"


def test_qwen_chat_template_is_chatml(qwen: Tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    text = qwen.apply_chat_template(msgs)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = qwen.apply_chat_template(msgs, tokenize=True)
    assert isinstance(ids, list) and qwen.decode(ids, skip_special_tokens=False) == text
    no_gen = qwen.apply_chat_template(msgs, add_generation_prompt=False)
    assert isinstance(no_gen, str) and not no_gen.endswith("<|im_start|>assistant\n")


def test_qwen_chat_template_override(tmp_path: os.PathLike, real_model_dir: str) -> None:
    MODEL_DIR = real_model_dir  # noqa: N806
    literal = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(MODEL_DIR, chat_template=literal)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    path = os.path.join(tmp_path, "t.jinja")
    with open(path, "w") as f:
        f.write("{{ messages[0]['content'] }}!")
    tok = load_tokenizer(MODEL_DIR, chat_template=path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(MODEL_DIR, chat_template="/no/such/template.jinja")
    raising = "{{ raise_exception('roles must alternate') }}"
    tok = load_tokenizer(MODEL_DIR, chat_template=raising)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_gguf_tokenizer_matches_folder(qwen: Tokenizer, qwen_gguf_path: str) -> None:
    tok = load_tokenizer(qwen_gguf_path)  # a path to the file; load_tokenizer(folder, gguf_file=name) also works
    text = "你好 hello 🎉"
    assert tok.encode(text, add_special_tokens=False) == qwen.encode(text, add_special_tokens=False)
    assert tok.eos_token_id == qwen.eos_token_id


def test_fast_decode_equals_transformers_decode(qwen: Tokenizer) -> None:
    """The Rust fast path must give exactly what transformers' decode gives, special tokens too."""
    rng = random.Random(5)
    special = sorted(qwen.all_special_ids)
    assert qwen._fast_decode is not None
    for _ in range(50):
        ids = [rng.randrange(0, 151643) for _ in range(rng.randint(1, 30))] + rng.sample(special, 2)
        rng.shuffle(ids)
        for skip in (True, False):
            assert qwen.decode(ids, skip_special_tokens=skip) == qwen.hf.decode(ids, skip_special_tokens=skip)


def test_named_fast_tokenizer_equals_autotokenizer(real_model_dir: str) -> None:
    """Start-up loads the class tokenizer_config.json names instead of AutoTokenizer: same tokens,
    text, special ids and chat template."""
    from transformers import AutoTokenizer

    from pagedserve.tokenizer import _load_named_fast_tokenizer

    ours, auto = _load_named_fast_tokenizer(real_model_dir), AutoTokenizer.from_pretrained(real_model_dir)
    assert ours is not None and type(ours) is type(auto) and ours.is_fast
    for text in ("Hello world", "def f(x):\n    return x ** 2  # 中文 ✓", "<|im_start|>user\nhi<|im_end|>"):
        ids = auto.encode(text)
        assert ours.encode(text) == ids and ours.decode(ids) == auto.decode(ids)
    assert (ours.eos_token_id, len(ours), ours.all_special_ids) == (auto.eos_token_id, len(auto), auto.all_special_ids)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_template_variables_reach_the_template(qwen: Tokenizer) -> None:
    """chat_template_kwargs (the server's) arrive as template variables, e.g. Qwen3's enable_thinking."""
    custom = Tokenizer(qwen.hf, set(), "{% if not enable_thinking %}/no_think {% endif %}{{ messages[0].content }}")
    msgs = [{"role": "user", "content": "hi"}]
    assert custom.apply_chat_template(msgs, enable_thinking=True) == "hi"
    assert custom.apply_chat_template(msgs, enable_thinking=False) == "/no_think hi"


def test_fill_in_the_middle_prompts_use_the_models_own_tokens(real_model_dir) -> None:
    """Qwen2.5-Coder's <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>; a tokenizer without FIM tokens
    refuses."""
    from pagedserve.tokenizer import load_tokenizer

    tok = load_tokenizer(real_model_dir)
    ids = tok.fim_ids("def add(a, b):\n    ", "\n\nprint(add(1, 2))")
    want = tok.hf("<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))<|fim_middle|>",
                  add_special_tokens=False)["input_ids"]
    assert ids == list(want)
    import types

    plain = Tokenizer(types.SimpleNamespace(eos_token_id=None, get_vocab=lambda: {"a": 1, "<fim_prefix>": 2}))
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        plain.fim_ids("a", "b")
