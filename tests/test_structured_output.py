"""Structured outputs (pagedserve/structured_output.py): every constraint kind holds on a random-weight
model, whose own preferences are noise (so the grammar alone must keep the output valid), and on the real
embedded model; bad constraints are ValueErrors; no KV block is left behind."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
import torch

from pagedserve.async_engine import AsyncEngine
from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.structured_output import apply_token_bitmask

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}


def check_person(value: dict) -> None:
    assert set(value) == {"name", "age", "city", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert value["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, bool) for t in value["tags"])


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=512, num_kv_blocks=256))


def run(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> dict[str, list]:
    """request id -> its finished CompletionOutputs."""
    free_before = engine.scheduler.num_free_blocks()
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    done: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
        steps += 1
        assert steps < 5000
    assert engine.scheduler.num_free_blocks() == free_before  # no KV block leaks
    assert not engine._constraints and not engine._sync_ids
    return done


def test_every_constraint_kind_holds_on_a_random_model(engine: LLMEngine) -> None:
    # Random weights would pad JSON with whitespace until max_tokens: compact JSON here (the real model test
    # below takes the default, any whitespace).
    specs = [
        StructuredOutputsParams(json=PERSON, disable_any_whitespace=True),
        StructuredOutputsParams(json=json.dumps(PERSON), disable_any_whitespace=True),
        StructuredOutputsParams(regex=r"[a-c]{2}-\d{3}"),
        StructuredOutputsParams(choice=["yes", "no", 'it "depends"']),
        StructuredOutputsParams(grammar='root ::= "(" [0-9] ("+" [0-9])* ")"'),
    ]
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured_outputs=s)
              for i, s in enumerate(specs)]
    # A plain request beside them: it runs in the same steps, unconstrained.
    params.append(SamplingParams(max_tokens=12, temperature=1.0, seed=9, ignore_eos=True))
    done = run(engine, ["Describe a person."] * len(params), params)
    texts = {rid: outs[0].text for rid, outs in done.items()}
    for rid in ("r0", "r1"):
        assert done[rid][0].finish_reason == "stop", texts[rid]
        check_person(json.loads(texts[rid]))
    assert re.fullmatch(r"[a-c]{2}-\d{3}", texts["r2"]), texts["r2"]
    assert texts["r3"] in ("yes", "no", 'it "depends"')
    assert re.fullmatch(r"\([0-9](\+[0-9])*\)", texts["r4"]), texts["r4"]
    assert len(done["r5"][0].token_ids) == 12
    # Each finished by its grammar's stop token (eos), not by length.
    eos = engine.tokenizer.eos_token_id
    for rid in ("r0", "r2", "r3", "r4"):
        assert done[rid][0].token_ids[-1] == eos


def test_json_object_and_n_siblings_each_hold(engine: LLMEngine) -> None:
    p = SamplingParams(n=3, max_tokens=300, temperature=1.0, seed=5,
                       structured_outputs=StructuredOutputsParams(json={"type": "object", "properties": {
                           "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
                           disable_any_whitespace=True))
    done = run(engine, ["x"], [p])
    assert len(done["r0"]) == 3
    for out in done["r0"]:
        assert isinstance(json.loads(out.text)["ok"], bool), out.text
    # json_object: any JSON object (random tokens: cut by max_tokens unless it closes, but always a prefix of one).
    q = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json_object": True,
                                                                           "disable_any_whitespace": True})
    text = run(engine, ["y"], [q])["r0"][0].text
    assert text.startswith("{") and "\n" not in text, text


def test_ignore_eos_still_stops_when_the_grammar_is_complete(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=50, ignore_eos=True, structured_outputs={"choice": ["alpha", "beta"]})
    out = run(engine, ["z"], [p])["r0"][0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"


def test_length_cut_leaves_a_valid_prefix(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=3, temperature=0.0, structured_outputs={"regex": "a{60}b"})
    out = run(engine, ["w"], [p])["r0"][0]
    assert out.finish_reason == "length" and re.fullmatch("a{1,59}", out.text), out.text


def test_a_grammar_that_allows_nothing_ends_at_once(engine: LLMEngine) -> None:
    out = run(engine, ["v"], [SamplingParams(max_tokens=20, structured_outputs={"grammar": "root ::= root"})])["r0"][0]
    assert out.finish_reason == "stop" and out.text == "" and len(out.token_ids) == 1


@pytest.mark.parametrize("spec, message", [
    ({"regex": "(("}, "regex constraint does not compile: Regex parsing error"),
    ({"json": {"type": "objekt"}}, 'json constraint does not compile: Unsupported type "objekt"'),
    ({"json": {"enum": []}}, "enum array must not be empty"),
    ({"grammar": "root ::= x"}, "grammar constraint does not compile: EBNF parser error"),
])
def test_constraints_that_do_not_compile_are_value_errors(engine: LLMEngine, spec: dict, message: str) -> None:
    free = engine.scheduler.num_free_blocks()
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("bad", "x", SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests() and engine.scheduler.num_free_blocks() == free


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": 3}, "must be a JSON Schema object"),
    ({"choice": []}, "choice must be a list"),
    ({"choice": ["a", 1]}, "choice must be a list"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"json_object": "yes"}, "json_object must be true or false"),
])
def test_bad_specs_are_value_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(**fields)
    with pytest.raises(ValueError, match="structured_outputs: .*unexpected keyword"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_apply_token_bitmask_matches_a_plain_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 5, 77  # a vocabulary that is not a multiple of 32; the mask has 3 words
    logits = torch.randn(rows, vocab, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    masked_rows = [0, 2, 4]
    out = logits.clone()
    apply_token_bitmask(out, masked_rows, list(words))
    expected = logits.clone()
    for i, r in enumerate(masked_rows):
        for t in range(vocab):
            if not (int(words[i, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.isinf(out[0]).any() and torch.equal(out[1], logits[1])


@pytest.mark.slow
def test_real_model_fills_a_schema(real_model_dir: str) -> None:
    from pagedserve.entrypoints.llm import LLM

    llm = LLM(real_model_dir, max_model_len=1024, cpu_kv_cache_gib=0.5)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "integer"}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                   SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json": schema}))[0]
    value = json.loads(out.outputs[0].text)
    assert value["capital"] == "Paris" and isinstance(value["population_millions"], int)
    choice = llm.chat([{"role": "user", "content": "Is the sky blue on a clear day? Answer yes or no."}],
                      SamplingParams(max_tokens=5, temperature=0.0, structured_outputs={"choice": ["yes", "no"]}))[0]
    assert choice.outputs[0].text == "yes"
    # LLM.chat(tools=...): the tools go into the template (Qwen's lists them in <tools>); constrained to a
    # function's parameters, the answer is a call's arguments.
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    call = llm.chat([{"role": "user", "content": "What is the weather in Oslo?"}],
                    SamplingParams(max_tokens=30, temperature=0.0,
                                   structured_outputs={"json": weather["function"]["parameters"]}),
                    tools=[weather])[0]
    assert "<tools>" in call.prompt and '"get_weather"' in call.prompt
    assert json.loads(call.outputs[0].text) == {"city": "Oslo"}


def test_async_scheduling_gives_the_same_tokens(tiny_model_dir: str, engine: LLMEngine) -> None:
    """With async scheduling on, a constrained row's mask is filled while its step's forward runs, once the step
    before's tokens reached the matchers (LLMEngine._step_async); every request's tokens equal the synchronous
    engine's (filling the masks before finishing the step before fails this)."""
    async_engine = LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=512,
                                          num_kv_blocks=256, async_scheduling=True))
    assert async_engine.async_scheduling and not engine.async_scheduling

    def params() -> list[SamplingParams]:
        # Five constrained rows: from four, an async step's masks fill on the mask thread while the step
        # before is processed (LLMEngine._attach_token_masks); one grammar ends early (r4), one never does.
        constrained = [{"regex": r"(ab|cd){2,5}x"}, {"choice": ["yes", "no"]}, {"regex": "[0-9]{3,40}"},
                       {"json": PERSON}, {"regex": "(xy)+z"}]
        return [SamplingParams(max_tokens=30, seed=1, ignore_eos=True),
                *[SamplingParams(max_tokens=60, seed=2 + i, structured_outputs=c) for i, c in enumerate(constrained)],
                SamplingParams(max_tokens=25, seed=9, ignore_eos=True)]

    prompts = ["p", "q", "r", "s", "t", "u", "v"]
    expected = run(engine, prompts, params())
    got = run(async_engine, prompts, params())
    assert async_engine._fill_pool is not None  # the overlapped fill ran
    assert {k: v[0].token_ids for k, v in got.items()} == {k: v[0].token_ids for k, v in expected.items()}
    assert re.fullmatch(r"(ab|cd){2,5}x", got["r1"][0].text)
    assert got["r2"][0].text in ("yes", "no") and re.fullmatch("[0-9]{3,40}", got["r3"][0].text)
    if got["r4"][0].finish_reason == "stop":  # else cut by max_tokens (random weights write long JSON)
        check_person(json.loads(got["r4"][0].text))


def test_apply_token_bitmask_takes_rows_in_any_order() -> None:
    """The sampler's rows are normally consecutive rows of the engine's buffer (copied as they lie); any other
    set of rows is stacked first: both give the same logits."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 2), generator=gen, dtype=torch.int64).to(torch.int32)
    a, b = logits.clone(), logits.clone()
    apply_token_bitmask(a, [3, 1], [words[2], words[0]])  # not consecutive: stacked
    apply_token_bitmask(b, [3, 1], list(torch.stack([words[2], words[0]])))  # consecutive
    assert torch.equal(a, b) and torch.isinf(a[3]).any() and torch.equal(a[0], logits[0])


def test_the_engine_loop_steps_on_while_a_grammar_compiles(tiny_model_dir: str) -> None:
    """Behind the server (EngineCore), a constraint compiles on a worker thread: another request runs to
    its end while the compile is held, then the constrained request is added with the compiled grammar."""
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=512, num_kv_blocks=256))
    backend = engine.structured_output_backend()
    gate = threading.Event()
    compile_grammar = backend.compile

    def held_compile(spec: StructuredOutputsParams):
        if spec.regex == "[0-9]{3}":
            assert gate.wait(60)
        return compile_grammar(spec)

    backend.compile = held_compile
    constrained = SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(regex="[0-9]{3}"))

    async def main():
        ae = AsyncEngine(engine, log_stats=False)
        ae.start()
        held = asyncio.create_task(ae.add_request("held", "digits:", constrained))
        await asyncio.sleep(0.05)
        free = [o async for o in ae.generate("hello", SamplingParams(max_tokens=8, ignore_eos=True), "free")]
        still_compiling = not held.done()
        spec = constrained.structured_outputs
        assert backend.compile_async(spec) is backend.compile_async(spec)  # one compile per constraint in flight
        gate.set()
        final = [o async for o in await held][-1]
        await ae.shutdown(5)
        return free[-1], still_compiling, final

    free, still_compiling, final = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(free.outputs[0].token_ids) == 8 and free.finished
    assert still_compiling
    assert re.fullmatch("[0-9]{3}", final.outputs[0].text)
    assert engine.scheduler.num_free_blocks() == 256 and not engine._constraints
