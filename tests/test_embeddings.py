"""Embeddings (LLM.embed, SamplingParams.for_pooling) on the real embedded model, fp32 on CPU, against Transformers'
final hidden state of the last token: chunked prefill, prefix-cache hits, batches beside generated requests, async
scheduling, dimensions / normalize, a prompt that fills the context, bad parameters, no leaked KV blocks.
(The server's /v1/embeddings: tests/entrypoints/test_server_real.py.)"""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, PoolingParams, SamplingParams

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris.",
    "x",
]


@pytest.fixture(scope="module")
def llm(real_model_dir: str) -> LLM:
    # A 16-token budget: the first text (~30 tokens) is computed in chunks.
    return LLM(real_model_dir, max_model_len=64, cpu_kv_cache_gib=0.1, max_num_batched_tokens=16,
               enable_prefix_caching=True)


@pytest.fixture(scope="module")
def hf_last_hidden(real_model_dir: str):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(real_model_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).last_hidden_state[0, -1]

    return run


def assert_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_embeddings_equal_transformers_normalized_last_hidden_state(llm: LLM, hf_last_hidden) -> None:
    tokenizer = llm.get_tokenizer()
    outs = llm.embed(TEXTS, use_tqdm=False)
    assert len(llm.get_tokenizer().encode(TEXTS[0])) > 16  # chunked
    for text, out in zip(TEXTS, outs):
        ids = tokenizer.encode(text)
        assert out.prompt_token_ids == ids
        ref = torch.nn.functional.normalize(hf_last_hidden(ids), dim=0)
        got = torch.tensor(out.outputs.embedding)
        assert got.shape == (896,)
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
        assert got.norm().item() == pytest.approx(1.0, abs=1e-5)
    # Again: the prompts' full blocks now come from the prefix cache; the vectors are the same.
    hits = llm.engine.get_stats()["prefix_cache_hits"]
    again = llm.embed(TEXTS, use_tqdm=False)
    assert llm.engine.get_stats()["prefix_cache_hits"] > hits
    for a, b in zip(outs, again):
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding), atol=1e-6)
    assert_free(llm)


def test_dimensions_and_unnormalized(llm: LLM, hf_last_hidden) -> None:
    ids = llm.get_tokenizer().encode(TEXTS[1])
    ref = hf_last_hidden(ids)
    raw, cut, cut_raw = llm.embed(
        [{"prompt_token_ids": ids}] * 3,
        [PoolingParams(normalize=False), PoolingParams(dimensions=32), PoolingParams(dimensions=32, normalize=False)],
        use_tqdm=False)
    assert torch.allclose(torch.tensor(raw.outputs.embedding), ref, atol=1e-4)
    assert torch.allclose(torch.tensor(cut_raw.outputs.embedding), ref[:32], atol=1e-4)
    assert torch.allclose(torch.tensor(cut.outputs.embedding), torch.nn.functional.normalize(ref[:32], dim=0),
                          atol=1e-5)
    assert_free(llm)


def test_embeddings_beside_generated_requests_change_neither(llm: LLM, hf_last_hidden) -> None:
    """Embedding and generated requests in the same steps: the generated text equals a run alone, the vectors
    equal Transformers'; the embedding requests' outputs hold no tokens."""
    engine = llm.engine
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(TEXTS[:2], greedy, use_tqdm=False)
    for i, text in enumerate(TEXTS[:2]):
        engine.add_request(f"gen{i}", text, greedy, final_only=True)
        engine.add_request(f"emb{i}", TEXTS[1 - i], SamplingParams.for_pooling(), final_only=True)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    for i in range(2):
        assert finished[f"gen{i}"].outputs[0].token_ids == alone[i].outputs[0].token_ids
        assert finished[f"gen{i}"].embedding is None
        emb = finished[f"emb{i}"]
        assert emb.outputs[0].token_ids == [] and emb.outputs[0].text == ""
        ref = torch.nn.functional.normalize(hf_last_hidden(emb.prompt_token_ids), dim=0)
        assert torch.allclose(torch.tensor(emb.embedding), ref, atol=1e-5)
    assert_free(llm)


def test_a_prompt_may_fill_the_context(llm: LLM, hf_last_hidden) -> None:
    ids = (llm.get_tokenizer().encode(TEXTS[0]) * 4)[:64]
    (out,) = llm.embed({"prompt_token_ids": ids}, use_tqdm=False)
    ref = torch.nn.functional.normalize(hf_last_hidden(ids), dim=0)
    assert torch.allclose(torch.tensor(out.outputs.embedding), ref, atol=1e-5)
    with pytest.raises(ValueError, match="context length is 64"):
        llm.embed({"prompt_token_ids": ids + [1]}, use_tqdm=False)
    assert_free(llm)


def test_bad_pooling_parameters_are_value_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="hidden size 896"):
        llm.embed("hello", PoolingParams(dimensions=897), use_tqdm=False)
    for bad in (dict(dimensions=0), dict(dimensions=2.5), dict(normalize="yes")):
        with pytest.raises(ValueError):
            PoolingParams(**bad)
    with pytest.raises(ValueError, match="for_pooling"):
        SamplingParams(n=2, max_tokens=1, pooling=PoolingParams())
    with pytest.raises(ValueError, match="for_pooling"):
        SamplingParams(max_tokens=5, pooling=PoolingParams())
    with pytest.raises(ValueError, match="pooling params for 2 prompts"):
        llm.embed(["a", "b"], [PoolingParams()], use_tqdm=False)
    assert_free(llm)


def test_async_scheduling_embeddings_equal(real_model_dir: str, llm: LLM) -> None:
    asynchronous = LLM(real_model_dir, max_model_len=64, cpu_kv_cache_gib=0.1, max_num_batched_tokens=16,
                       async_scheduling=True)
    assert asynchronous.engine.async_scheduling
    expected = llm.embed(TEXTS, use_tqdm=False)
    got = asynchronous.embed(TEXTS, use_tqdm=False)
    for a, b in zip(expected, got):
        assert torch.allclose(torch.tensor(a.outputs.embedding), torch.tensor(b.outputs.embedding), atol=1e-6)
    asynchronous.engine.step()  # a step in flight past the end is collected
    assert_free(asynchronous)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_bare_decoder_checkpoint_serves_embeddings_only(tmp_path, real_model_dir, arch) -> None:
    """An embedding model saved as Transformers' bare decoder (Qwen2Model / Qwen3Model: no LM head, tensor names
    without "model."): embeddings equal its last hidden state; generating is a ValueError."""
    from transformers import Qwen2Model, Qwen3Model

    from tests.executor.helpers import randomize_, tiny_hf_config

    config = tiny_hf_config(arch, tie_word_embeddings=False)
    bare = (Qwen2Model if arch == "qwen2" else Qwen3Model)(config)
    randomize_(bare, seed=2)
    bare.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), tokenizer=real_model_dir, max_model_len=64, cpu_kv_cache_gib=0.05, dtype="float32")
    assert llm.engine.embedding_only
    prompts = [[5, 17, 99, 3, 42], [11, 12]]
    for prompt, out in zip(prompts, llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)):
        with torch.no_grad():
            ref = torch.nn.functional.normalize(bare.eval()(torch.tensor([prompt])).last_hidden_state[0, -1], dim=0)
        assert torch.allclose(torch.tensor(out.outputs.embedding), ref, atol=1e-5)
    with pytest.raises(ValueError, match="serves embeddings only"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert_free(llm)


def test_score_is_the_cosine_of_the_embeddings(llm: LLM, hf_last_hidden) -> None:
    """LLM.score (vLLM's, for an embedding model): pairs 1:1, 1:N, N:N, each the cosine of Transformers' last hidden
    states; bad pairings are ValueErrors."""
    tokenizer = llm.get_tokenizer()
    vec = {t: torch.nn.functional.normalize(hf_last_hidden(tokenizer.encode(t)), dim=0) for t in TEXTS}
    one_to_n = llm.score(TEXTS[1], TEXTS, use_tqdm=False)
    assert [o.outputs.score for o in one_to_n] == pytest.approx([float(vec[TEXTS[1]] @ vec[t]) for t in TEXTS],
                                                                abs=1e-5)
    assert one_to_n[1].outputs.score == pytest.approx(1.0, abs=1e-5)  # a text against itself
    assert one_to_n[0].prompt_token_ids == tokenizer.encode(TEXTS[1]) + tokenizer.encode(TEXTS[0])
    pairwise = llm.score(TEXTS[:2], TEXTS[1:], use_tqdm=False)
    assert [o.outputs.score for o in pairwise] == pytest.approx(
        [float(vec[TEXTS[0]] @ vec[TEXTS[1]]), float(vec[TEXTS[1]] @ vec[TEXTS[2]])], abs=1e-5)
    with pytest.raises(ValueError, match="lengths must be 1:1, 1:N or N:N"):
        llm.score(TEXTS[:2], TEXTS, use_tqdm=False)
    with pytest.raises(ValueError, match="text_2 must not be an empty list"):
        llm.score("a", [], use_tqdm=False)
    assert_free(llm)
