"""Beam search (LLM.beam_search, BeamSearchParams; pagedserve/beam_search.py) against a reference written here on
Transformers' logits (fp32, CPU): the same beams, answers and cumulative logprobs, with an EOS token among the
candidates, length penalties, ignore_eos, several prompts at once; and the step logic alone on a fake model."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve import LLM, BeamSearchParams
from pagedserve.beam_search import BeamSearch
from pagedserve.core.outputs import TokenLogprobs
from tests.executor.test_tensor_parallel import tiny_checkpoint


def reference(hf, prompt: list[int], width: int, max_tokens: int, eos: set[int], length_penalty: float = 1.0):
    """[(tokens, cum_logprob, finished by EOS)] best first, by the rules in beam_search.py's docstring."""
    def score(beam):
        tokens, cum, stopped = beam
        return cum / ((len(tokens) - stopped) ** length_penalty)

    beams, finished = [(list(prompt), 0.0, False)], []
    with torch.no_grad():
        for _ in range(max_tokens):
            if not beams:
                break
            candidates = []
            for tokens, cum, _ in beams:
                logprobs = torch.log_softmax(hf(torch.tensor([tokens])).logits[0, -1].double(), -1)
                top = logprobs.topk(2 * width)
                for lp, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    new = (tokens + [token], cum + lp, token in eos)
                    (finished if token in eos else candidates).append(new)
            beams = sorted(candidates, key=score, reverse=True)[:width]
    return sorted(finished + beams, key=score, reverse=True)[:width]


@pytest.fixture(scope="module")
def model(tmp_path_factory, real_model_dir):
    folder = tmp_path_factory.mktemp("beam")
    hf = tiny_checkpoint(folder, real_model_dir, "qwen2").eval()
    # An EOS token the tiny model ranks 4th after the first prompt: finished beams appear from the first step.
    with torch.no_grad():
        eos = int(hf(torch.tensor([PROMPTS[0]])).logits[0, -1].topk(4).indices[3])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder, hf, eos


PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [11, 12, 13], list(range(30, 60))]


@pytest.mark.parametrize(("width", "max_tokens", "length_penalty"), [(3, 5, 1.0), (2, 4, 0.0), (4, 3, 2.0)])
def test_beams_match_the_reference(model, width, max_tokens, length_penalty) -> None:
    folder, hf, eos = model
    llm = LLM(str(folder), dtype="float32", cpu_kv_cache_gib=0.05, max_model_len=128)
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert len(outs) == len(PROMPTS)
    saw_stop = False
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want = reference(hf, prompt, width, max_tokens, {eos}, length_penalty)
        assert [s.tokens for s in out.sequences] == [tokens for tokens, _, _ in want]
        assert [s.cum_logprob for s in out.sequences] == pytest.approx([cum for _, cum, _ in want], abs=1e-4)
        for seq, (tokens, _, stopped) in zip(out.sequences, want, strict=True):
            assert seq.finish_reason == ("stop" if stopped else "length")
            assert len(seq.logprobs) == len(tokens) - len(prompt)
            generated = tokens[len(prompt):-1] if stopped else tokens[len(prompt):]
            assert seq.text == llm.get_tokenizer().decode(generated)
            saw_stop |= stopped
    if width == 3:
        assert saw_stop  # the EOS candidate finished some beam (else this case tests less than it says)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_ignore_eos_and_text_prompts(model) -> None:
    folder, hf, eos = model
    llm = LLM(str(folder), dtype="float32", cpu_kv_cache_gib=0.05, max_model_len=128)
    out = llm.beam_search({"prompt_token_ids": PROMPTS[0]},
                          BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))[0]
    want = reference(hf, PROMPTS[0], 3, 4, set())
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _, _ in want]
    assert all(s.finish_reason == "length" and len(s.tokens) == len(PROMPTS[0]) + 4 for s in out.sequences)
    # A text prompt is tokenized as generate() does.
    text_out = llm.beam_search("!", BeamSearchParams(beam_width=2, max_tokens=2))[0]  # ids below the tiny vocab
    ids = llm.get_tokenizer().encode("!")
    assert all(s.tokens[: len(ids)] == ids for s in text_out.sequences)
    # concurrency_limit (vLLM's): the prompts searched a few at a time give the same beams
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    together = llm.beam_search(prompts, params)
    for limit in (1, 2):
        apart = llm.beam_search(prompts, params, concurrency_limit=limit)
        assert [[s.tokens for s in o.sequences] for o in apart] == [[s.tokens for s in o.sequences] for o in together]
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(prompts, params, concurrency_limit=0)


def test_bad_params_are_value_errors(model) -> None:
    for kwargs in (dict(beam_width=0, max_tokens=3), dict(beam_width=11, max_tokens=3),
                   dict(beam_width=2, max_tokens=0), dict(beam_width=2, max_tokens=3, temperature=-1.0),
                   dict(beam_width=2, max_tokens=3, length_penalty=float("nan")), dict(beam_width=True, max_tokens=3)):
        with pytest.raises(ValueError):
            BeamSearchParams(**kwargs)
    folder, _, _ = model
    llm = LLM(str(folder), dtype="float32", cpu_kv_cache_gib=0.05, max_model_len=128)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], {"beam_width": 2})


def step_result(table: dict[int, float]) -> TokenLogprobs:
    top = sorted(table.items(), key=lambda kv: -kv[1])
    return TokenLogprobs(top[0][0], top[0][1], 1, top)


def test_step_logic_on_a_fake_model() -> None:
    """Two tokens a step: EOS (9) ends a beam; the finished one wins over longer live ones by score."""
    search = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=3), eos_token_ids={9})
    assert search.pending() == [[1, 2]]
    search.advance([step_result({5: -0.1, 9: -0.2, 6: -3.0, 7: -4.0})])
    assert search.pending() == [[1, 2, 5], [1, 2, 6]]  # 9 finished: [1, 2, 9], score -0.2 / 2
    search.advance([step_result({5: -2.0, 6: -2.5, 7: -5.0, 8: -6.0}), step_result({5: -0.1, 6: -0.2, 7: -9, 8: -9})])
    search.advance([step_result({5: -1.0, 6: -1.5, 7: -5.0, 8: -6.0}), step_result({5: -1.0, 6: -1.2, 7: -9, 8: -9})])
    assert search.done and search.pending() == []
    out = search.result(lambda ids: ",".join(map(str, ids)))
    best = out.sequences[0]
    assert best.tokens == [1, 2, 9] and best.finish_reason == "stop" and best.stop_reason == 9 and best.text == ""
    assert best.cum_logprob == pytest.approx(-0.2)
    assert out.sequences[1].finish_reason == "length" and len(out.sequences[1].tokens) == 5
    with pytest.raises(ValueError, match="step results"):
        BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=2), set()).advance([])
