"""End-to-end tests of the offline API on the real embedded model (Qwen2.5-Coder-0.5B-Instruct, fp32 CPU)."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig

CHATS = [
    [{"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "What is a GPU?"}],
    [{"role": "user", "content": "List three prime numbers."}],
]


@pytest.fixture(scope="module")
def llm(real_model_dir: str) -> LLM:
    return LLM(real_model_dir, max_model_len=1024, cpu_kv_cache_gib=0.5)


def test_greedy_batch_equals_hf_generate(llm: LLM, real_model_dir: str) -> None:
    """Acceptance: greedy 32 tokens for 4 chat prompts run as one batch equal HF generate, token for token."""
    from transformers import AutoModelForCausalLM

    # min_tokens masks eos exactly as HF's min_new_tokens does, so both run all 32 steps.
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
    outputs = llm.chat(CHATS, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    hf.eval()
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=151643)
        ref_new = ref[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref_new, (out.outputs[0].text, llm.get_tokenizer().decode(ref_new))
    assert "tomato" in outputs[0].outputs[0].text.lower() or "why" in outputs[0].outputs[0].text.lower()


def test_preemption_by_recompute_matches_unconstrained(llm: LLM, real_model_dir: str) -> None:
    """Acceptance: a KV cache holding a third of the workload still finishes every request, with
    greedy outputs equal to an unconstrained run; the number of preemptions is reported."""
    prompts = [f"Count from {i} to {i + 30}, separated by commas:" for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    num_tokens = [len(tokenizer.encode(p)) + params.max_tokens for p in prompts]
    blocks_needed = sum(-(-n // 16) for n in num_tokens)
    free_run = llm.generate(prompts, params, use_tqdm=False)
    small = LLM(real_model_dir, max_model_len=1024, num_kv_blocks=blocks_needed // 3)
    tight_run = small.generate(prompts, params, use_tqdm=False)
    preemptions = small.engine.get_stats()["num_preemptions"]
    print(f"KV blocks {blocks_needed // 3} of {blocks_needed} needed: {preemptions} preemptions")
    assert preemptions > 0
    for a, b in zip(free_run, tight_run):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].token_ids) == params.max_tokens
    assert small.engine.get_stats()["num_free_blocks"] == blocks_needed // 3


def test_seed_alone_equals_seed_in_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234)
    alone = llm.generate(["Once upon a time"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12, seed=s) for s in range(7)]
    batch = llm.generate(["Once upon a time"] + [f"Story {i}:" for i in range(7)], [seeded] + others,
                         use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone


def test_n_choices_share_prompt_and_stop_strings(llm: LLM) -> None:
    out = llm.generate("The alphabet: A, B, C,", SamplingParams(n=3, temperature=0.9, max_tokens=10, seed=7),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) >= 1 for c in out.outputs)
    stopped = llm.generate("The alphabet: A, B, C,", SamplingParams(temperature=0.0, max_tokens=30, stop=[" F"]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " F"
    assert " F" not in stopped.text and "E" in stopped.text
    assert llm.engine.get_stats()["num_running"] == 0


def test_a_stop_token_that_ends_a_request_is_not_in_its_text(llm: LLM) -> None:
    """vLLM's rule: eos (kept by skip_special_tokens=False) or a stop_token_ids token that ends the request is
    left out of the text, unless include_stop_str_in_output; token_ids keep it either way. Offline (the engine's
    own text) here; through the server's delta decoder in test_server_real.py."""
    chat = [{"role": "user", "content": "Say hi."}]
    bang = llm.get_tokenizer().encode("!")
    texts = {}
    for include in (False, True):
        specials = SamplingParams(max_tokens=40, temperature=0, skip_special_tokens=False,
                                  include_stop_str_in_output=include)
        stops = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=bang, include_stop_str_in_output=include)
        for name, params in (("eos", specials), ("stop id", stops)):
            for final_only in (True, False):  # one decode at the end, and token by token
                out = (llm.chat(chat, params, use_tqdm=False)[0].outputs[0] if final_only
                       else _stream_one(llm, chat, params))
                assert out.finish_reason == "stop"
                texts.setdefault((name, include), set()).add(out.text)
                assert out.token_ids[-1] == (bang[0] if name == "stop id" else llm.get_tokenizer().eos_token_id)
    assert texts[("eos", False)] == {"Hello! How can I assist you today?"}
    assert texts[("eos", True)] == {"Hello! How can I assist you today?<|im_end|>"}
    assert texts[("stop id", False)] == {"Hello"} and texts[("stop id", True)] == {"Hello!"}


def _stream_one(llm: LLM, chat: list, params: SamplingParams):
    """The request's last output when the engine reports it every step (the server's mode of the engine)."""
    engine = llm.engine
    prompt = llm.engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    engine.add_request("streamed", prompt, params)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
    return last.outputs[0]


def test_bad_input_raises_value_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="context length is 1024"):  # (a max_tokens past it stops at its end)
        llm.generate([[5] * 1100], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_continues_the_final_message(llm: LLM, real_model_dir: str) -> None:
    """LLM.chat(continue_final_message=True): the last (assistant) message left open, as Transformers renders it."""
    from transformers import AutoTokenizer

    convo = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    expected = AutoTokenizer.from_pretrained(real_model_dir).apply_chat_template(
        convo, continue_final_message=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    out = llm.chat(convo, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)[0]
    assert out.prompt_token_ids == expected
    with pytest.raises(ValueError, match="continue_final_message needs add_generation_prompt=False"):
        llm.chat(convo, continue_final_message=True, use_tqdm=False)


def test_min_tokens_holds_back_stop_strings(llm: LLM) -> None:
    """vLLM's rule: no stop string ends a request within its first min_tokens tokens (the greedy answer to a code
    prompt breaks its line within a few tokens)."""
    prompt = "def add(a, b):\n"
    early = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=["\n"]), use_tqdm=False)[0]
    out = early.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "\n" and len(out.token_ids) < 8
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=["\n"], min_tokens=8),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 8 and held.token_ids[:len(out.token_ids)] == out.token_ids
    assert held.text.startswith(out.text + "\n")


def test_chat_takes_a_template_of_its_own(llm: LLM) -> None:
    """LLM.chat(chat_template=...) (vLLM's keyword): the call's template renders the prompt instead of the model's;
    the prompt token ids are exactly the custom template's text encoded."""
    messages = [{"role": "user", "content": "two plus two"}]
    template = "Question: {{ messages[-1]['content'] }}\nAnswer:"
    params = SamplingParams(temperature=0.0, max_tokens=3)
    out = llm.chat(messages, params, use_tqdm=False, chat_template=template)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("Question: two plus two\nAnswer:",
                                                              add_special_tokens=False)
    default = llm.chat(messages, params, use_tqdm=False)[0]
    assert default.prompt_token_ids != out.prompt_token_ids  # the model's own template otherwise


def test_chat_takes_vllms_positional_order_and_content_format(llm: LLM) -> None:
    """LLM.chat's parameters in vLLM's order (messages, sampling_params, use_tqdm, lora_request, chat_template,
    chat_template_content_format, ...), so positional calls written for vLLM mean the same here; a template that
    loops over content parts gets parts under "auto"."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}]}]
    template = "{% for m in messages %}{% for p in m['content'] %}({{ p['text'] }}){% endfor %}{% endfor %} ="
    params = SamplingParams(temperature=0.0, max_tokens=2)
    encode = llm.get_tokenizer().encode
    out = llm.chat(messages, params, False, None, template)[0]
    assert out.prompt_token_ids == encode("(two)(three) =", add_special_tokens=False)
    joined = llm.chat(messages, params, False, None, template, "string")[0]
    # "two\nthree" as one string: the loop walks its 9 characters, which have no 'text'
    assert joined.prompt_token_ids == encode("()" * 9 + " =", add_special_tokens=False)
    with pytest.raises(ValueError, match="mm_processor_kwargs"):
        llm.chat(messages, params, use_tqdm=False, mm_processor_kwargs={"num_crops": 4})
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(messages, params, False, None, None, "auto", "yes")


def test_truncate_prompt_tokens_detokenize_and_clone(llm: LLM) -> None:
    """vLLM's SamplingParams fields: truncate_prompt_tokens keeps the prompt's last N tokens (-1: up to
    max_model_len); detokenize=False makes the same tokens with no text (and refuses stop strings); clone()."""
    ids = llm.get_tokenizer().encode("def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return")
    params = SamplingParams(temperature=0.0, max_tokens=5, truncate_prompt_tokens=8)
    cut, direct, whole = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[-8:]},
                                       {"prompt_token_ids": ids}],
                                      [params, SamplingParams(temperature=0.0, max_tokens=5),
                                       SamplingParams(temperature=0.0, max_tokens=5, truncate_prompt_tokens=-1)],
                                      use_tqdm=False)
    assert cut.prompt_token_ids == ids[-8:] and len(ids) > 8
    assert cut.outputs[0].token_ids == direct.outputs[0].token_ids
    assert whole.prompt_token_ids == ids
    with pytest.raises(ValueError, match="has 1024 tokens"):  # -1: the last max_model_len tokens (then too many)
        llm.generate({"prompt_token_ids": ids * 100}, SamplingParams(max_tokens=5, truncate_prompt_tokens=-1),
                     use_tqdm=False)
    quiet = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=5, detokenize=False),
                         use_tqdm=False)[0]
    assert quiet.outputs[0].text == "" and quiet.outputs[0].token_ids == whole.outputs[0].token_ids
    assert whole.outputs[0].text
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["\n"], detokenize=False)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    assert SamplingParams.from_optional(temperature=None, top_p=0.5, max_tokens=None, n=None).max_tokens is None
    assert SamplingParams.from_optional(temperature=None, top_p=0.5).temperature == 1.0
    assert SamplingParams(n=2, best_of=2).n == 2
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=1, best_of=3)
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[lambda ids, logits: logits])
    original = SamplingParams(stop=["x"], logit_bias={3: 1.0})
    copy = original.clone()
    copy.stop.append("y")
    copy.logit_bias[4] = 2.0
    assert original.stop == ["x"] and original.logit_bias == {3: 1.0} and copy.stop == ["x", "y"]


def test_vllm_engine_arguments_and_dtype_spellings() -> None:
    """vLLM's engine arguments that ask for what pagedserve does anyway are taken (trust_remote_code=True, ...);
    ones asking for something else are a ValueError saying why; vLLM's dtype spellings map onto ours."""
    config = EngineConfig.from_kwargs(model="m", trust_remote_code=True, swap_space=4, enable_chunked_prefill=True,
                                      tokenizer_mode="auto", task="generate", compilation_config=3,
                                      distributed_executor_backend="mp", pipeline_parallel_size=1, dtype="half")
    assert config.dtype == "float16"
    assert EngineConfig.from_kwargs(model="m", dtype=torch.bfloat16).dtype == "bfloat16"
    assert EngineConfig.from_kwargs(model="m", dtype="float").dtype == "float32"
    for kwargs, why in (({"pipeline_parallel_size": 2}, "pipeline parallelism"),
                        ({"enable_chunked_prefill": False}, "always chunked"),
                        ({"cpu_offload_gb": 4}, "not offloaded"), ({"task": "reward"}, "task='reward'"),
                        ({"distributed_executor_backend": "ray"}, "local processes"),
                        ({"limit_mm_per_prompt": {"image": 1}}, "text-only"),
                        ({"no_such_argument": 1}, "unknown engine arguments: no_such_argument"),
                        ({"dtype": "float8"}, "dtype must be one of")):
        with pytest.raises(ValueError, match=why):
            EngineConfig.from_kwargs(model="m", **kwargs)


def test_offline_max_tokens_past_the_context_stops_at_its_end(real_model_dir: str) -> None:
    """As vLLM's LLM: max_tokens past max_model_len generates until the context is full (finish_reason "length");
    the server keeps refusing such a request (a 400, as OpenAI's). get_tokenizer() is the Hugging Face tokenizer
    (apply_chat_template gives token ids by default); llm_engine.model_config and get_tokenizer() as vLLM's."""
    small = LLM(real_model_dir, max_model_len=48, trust_remote_code=True, swap_space=1, cpu_kv_cache_gib=0.05)
    tokenizer = small.get_tokenizer()
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n    return")["input_ids"]
    out = small.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=100, ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 48 - len(ids) and out.outputs[0].finish_reason == "length"
    tiny_cache = LLM(real_model_dir, max_model_len=512, num_kv_blocks=4)  # 64 tokens of KV cache
    out = tiny_cache.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1000, ignore_eos=True),
                              use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 64 + 1 - len(ids)  # as far as the cache holds (its last token uncached)
    with pytest.raises(ValueError, match="maximum context length"):  # the server's engine: a 400
        small.engine.clip_max_tokens = False
        small.engine.add_request("r", ids, SamplingParams(max_tokens=100))
    chat = [{"role": "user", "content": "hi"}]
    chat_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)  # token ids by default, as HF's
    chat_ids = chat_ids if isinstance(chat_ids, list) else chat_ids["input_ids"]  # (Transformers 5: a BatchEncoding)
    assert chat_ids == small.engine.tokenizer.apply_chat_template(chat, tokenize=True)
    assert type(tokenizer).__module__.startswith("transformers") and len(tokenizer) == 151936
    assert tokenizer.decode(ids) == "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
    engine = small.llm_engine
    assert engine.get_tokenizer() is tokenizer
    assert engine.model_config.max_model_len == 48 and engine.model_config.get_vocab_size() == 151936
    assert engine.model_config.dtype == torch.float32 and engine.model_config.model == real_model_dir


def test_vllm_import_paths_and_prompt_dicts(llm: LLM) -> None:
    """The names vLLM users import (pagedserve.inputs' TokensPrompt / TextPrompt, GuidedDecodingParams and
    SamplingParams(guided_decoding=...), top-level RequestOutput / CompletionOutput), prompt dicts held to vLLM's
    keys (multimodal ones refused: text-only models), and generate([]) -> []."""
    import pagedserve
    from pagedserve.inputs import TextPrompt, TokensPrompt
    from pagedserve.sampling_params import BeamSearchParams, GuidedDecodingParams, StructuredOutputsParams

    assert pagedserve.RequestOutput.__name__ == "RequestOutput" and pagedserve.CompletionOutput
    assert BeamSearchParams is pagedserve.BeamSearchParams and GuidedDecodingParams is StructuredOutputsParams
    ids = llm.get_tokenizer().encode("The capital of France is")
    params = SamplingParams(temperature=0.0, max_tokens=3)
    by_ids, by_text = llm.generate([TokensPrompt(prompt_token_ids=ids), TextPrompt(prompt="The capital of France is")],
                                   params, use_tqdm=False)
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids and by_ids.prompt_token_ids == ids
    guided = llm.generate("Is water wet? Answer:", SamplingParams(
        temperature=0.0, max_tokens=4, guided_decoding=GuidedDecodingParams(choice=["yes", "no"])), use_tqdm=False)[0]
    assert guided.outputs[0].text in ("yes", "no")
    assert llm.generate([], params) == []
    for prompt, message in (({"prompt": "x", "multi_modal_data": {"image": object()}}, "text-only"),
                            ({"prompt": "x", "promtp_token_ids": [1]}, "promtp_token_ids")):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, params, use_tqdm=False)
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(guided_decoding={"regex": "a"}, structured_outputs={"regex": "b"})
    with pytest.raises(ValueError, match="whitespace_pattern"):
        StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=r"[ ]?")
    assert StructuredOutputsParams(json={"type": "object"}, disable_additional_properties=True, backend="xgrammar")


def test_list_fields_given_a_scalar_are_a_value_error() -> None:
    """SamplingParams(stop=5) and the like raised TypeError from deep inside; a ValueError names the field."""
    for field, value in (("stop", 5), ("stop_token_ids", 5), ("bad_words_token_ids", [1]), ("stop", {"a": 1})):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})


def test_flag_fields_given_a_non_bool_are_a_value_error() -> None:
    """ignore_eos="false" was taken as true (a non-empty string): the flags take True or False only."""
    for field in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        for value in ("false", 0, 1, None):
            with pytest.raises(ValueError, match=field):
                SamplingParams(**{field: value})
        assert getattr(SamplingParams(**{field: True}), field) is True
