"""The server with sequence classification models, in a subprocess (tiny random classifiers saved by Transformers,
the real tokenizer beside them): POST /classify's probabilities and labels, /score and /rerank through a one-label
cross-encoder, all against Transformers' own classification model; what such a server refuses (400s)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.entrypoints.conftest import RealServer
from tests.test_classify import classifier_checkpoint

pytestmark = pytest.mark.slow


def test_classify_endpoint_and_refusals(tmp_path, real_model_dir) -> None:
    hf = classifier_checkpoint(tmp_path, real_model_dir, "qwen2", 3, vocab_size=151_936)
    server = RealServer(str(tmp_path), "--cpu-kv-cache-gib", "0.05", "--max-model-len", "128")
    try:
        texts = ["I loved this film", "terrible service, never again", "it was fine"]
        body = httpx.post(server.base_url + "/classify", json={"input": texts}, timeout=60).json()
        ids = httpx.post(server.base_url + "/tokenize", json={"prompt": texts[1]}, timeout=60).json()["tokens"]
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["object"] == "list"
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].softmax(-1)
        row = body["data"][1]
        assert row["num_classes"] == 3 and row["probs"] == pytest.approx(want.tolist(), abs=1e-5)
        assert row["label"] == hf.config.id2label[int(want.argmax())]
        assert body["usage"]["prompt_tokens"] > len(texts)
        v1 = httpx.post(server.base_url + "/v1/classify", json={"input": [ids]}, timeout=60).json()
        assert v1["data"][0]["probs"] == pytest.approx(row["probs"], abs=1e-6)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        with pytest.raises(openai.BadRequestError, match="classification and scoring only"):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="does not embed"):
            client.embeddings.create(model=model, input="hi")
        bad = httpx.post(server.base_url + "/score", json={"text_1": "a", "text_2": "b"}, timeout=60)
        assert bad.status_code == 400 and "one-label" in bad.json()["error"]["message"]
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_score_and_rerank_through_a_cross_encoder(tmp_path, real_model_dir) -> None:
    hf = classifier_checkpoint(tmp_path, real_model_dir, "qwen2", 1, vocab_size=151_936)
    server = RealServer(str(tmp_path), "--cpu-kv-cache-gib", "0.05", "--max-model-len", "128")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
        query, docs = "where did the cat sit?", ["on the mat", "prices fell", "the cat sat on the mat"]
        want = []
        for doc in docs:
            with torch.no_grad():
                want.append(hf(torch.tensor([tokenizer(query, doc)["input_ids"]])).logits[0, 0].sigmoid().item())
        scored = httpx.post(server.base_url + "/score", json={"text_1": query, "text_2": docs}, timeout=60).json()
        assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
        ranked = httpx.post(server.base_url + "/rerank", json={"query": query, "documents": docs, "top_n": 2},
                            timeout=60).json()
        order = sorted(range(3), key=lambda i: -want[i])[:2]
        assert [r["index"] for r in ranked["results"]] == order
        assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([want[i] for i in order], abs=1e-5)
    finally:
        server.stop()
