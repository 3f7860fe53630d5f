"""The server with speculative decoding (`--speculative-config`: n-gram drafts, a draft model), in a subprocess on
the tiny random-weight Qwen2: the official client's answers, streamed and not, equal a server's without drafts;
the drafts show in /metrics; a bad config stops the server at start with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.entrypoints.conftest import REPO_ROOT, RealServer

pytestmark = pytest.mark.slow

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
PROMPTS = ["one two three one two three one two three one two", "alpha beta alpha beta alpha beta alpha",
           "x y z w x y z w x y"]


def answers(server: RealServer) -> list:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    out = []
    for prompt in PROMPTS:
        full = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                         logprobs=1, extra_body={"ignore_eos": True})
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=model, prompt=prompt, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed == full.choices[0].text
        seeded = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=24, temperature=0.9, seed=7)
        out.append((full.choices[0].text, [round(x, 3) for x in full.choices[0].logprobs.token_logprobs],
                    full.usage.completion_tokens, seeded.choices[0].message.content))
    return out


def test_drafted_answers_equal_plain_ones_and_show_in_metrics(tiny_model_dir) -> None:
    """Plain, n-gram drafts, and a draft model (the same dummy-weight checkpoint: the same random weights, so its
    drafts for the greedy answers are kept)."""
    draft = json.dumps({"method": "draft_model", "model": tiny_model_dir, "num_speculative_tokens": 3})
    results, metrics = [], []
    for flags in ((), ("--speculative-config", SPEC), ("--speculative-config", draft)):
        server = RealServer(tiny_model_dir, "--load-format", "dummy", "--cpu-kv-cache-gib", "0.25",
                            "--max-model-len", "256", *flags)
        try:
            results.append(answers(server))
            metrics.append(httpx.get(server.base_url + "/metrics").text)
        finally:
            server.stop()
    assert results[0] == results[1] == results[2]
    assert all(r[2] == 40 for r in results[1])
    # (the draft model's greedy drafts match the greedy answers; the seeded answers at temperature 0.9 keep fewer)
    for text, min_rate in ((metrics[1], 0.0), (metrics[2], 0.6)):
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("pagedserve:spec_decode")}
        drafts = next(v for k, v in values.items() if k.startswith("pagedserve:spec_decode_num_drafts_total"))
        proposed = next(v for k, v in values.items() if k.startswith("pagedserve:spec_decode_num_draft_tokens_total"))
        accepted = next(v for k, v in values.items()
                        if k.startswith("pagedserve:spec_decode_num_accepted_tokens_total"))
        per_position = [v for k, v in values.items()
                        if k.startswith("pagedserve:spec_decode_num_accepted_tokens_per_pos")]
        assert drafts > 0 and 0 < accepted <= proposed and sum(per_position) == accepted
        assert accepted >= min_rate * proposed


def test_a_bad_speculative_config_stops_the_server_with_the_reason(tiny_model_dir) -> None:
    bad = json.dumps({"method": "eagle", "num_speculative_tokens": 2})
    proc = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.openai", tiny_model_dir,
                           "--speculative-config", bad], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not yet supported" in proc.stderr
