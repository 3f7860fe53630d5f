"""`pagedserve serve --data-parallel-size 2` in a subprocess on the real embedded model: two engine processes behind
one server. Concurrent greedy answers equal Transformers', both replicas serve, the merged /metrics equal the sum of
the replicas', control messages reach both, no block leaks, and a replica killed mid-stream fails that stream only
and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest
import torch

from tests.entrypoints.conftest import RealServer

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "# Sort a list in Python\n", "class Stack:",
           "SELECT name FROM", "public static void main(", "fn main() {", "The quick brown fox"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(real_model_dir):
    s = RealServer(real_model_dir, "--data-parallel-size", "2", "--max-model-len", "512", "--cpu-kv-cache-gib", "0.25",
                   "--shutdown-timeout", "120", new_session=True)
    yield s
    s.stop()


def metrics(server) -> dict[str, float]:
    """name{labels} -> value (samples of /metrics, the model_name label dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def replica_pids(server) -> list[int]:
    """The server's engine processes (its multiprocessing spawn children, not the resource tracker)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            pids.append(int(pid))
    return sorted(pids)


def test_concurrent_greedy_answers_equal_transformers_and_both_replicas_serve(server, real_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(replica_pids(server)) == 2
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]

    async def one(prompt: str):
        return await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    async def all_of():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    answers = asyncio.run(all_of())
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer.choices[0].text == expected, prompt
    m = metrics(server)
    per_replica = [m['pagedserve:replica_generation_tokens_total{engine="0"}'],
                   m['pagedserve:replica_generation_tokens_total{engine="1"}']]
    assert min(per_replica) > 0, per_replica  # both replicas generated
    assert sum(per_replica) == m["pagedserve:generation_tokens_total"]
    assert m["pagedserve:num_total_kv_blocks"] == sum(m[f'pagedserve:replica_num_total_kv_blocks{{engine="{i}"}}']
                                                      for i in (0, 1))


def test_parallel_sampling_aborts_and_reset_leave_no_blocks_held(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    r = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=6, n=3, temperature=1.0, seed=1)
    assert len(r.choices) == 3 and r.usage.completion_tokens == 18
    # Streams closed after their first chunk: aborted on whichever replica serves them.
    for i in range(4):
        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                          json={"model": model, "prompt": f"# task {i}\n", "max_tokens": 200, "stream": True,
                                "ignore_eos": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(server)
        if m["pagedserve:num_requests_running"] == 0 and m["pagedserve:num_requests_in_flight"] == 0:
            break
        time.sleep(0.2)
    assert m["pagedserve:num_requests_running"] == 0
    # Idle: every block of both replicas is free or only cached; a reset (sent to both) frees them all.
    assert httpx.post(server.base_url + "/reset_prefix_cache").status_code == 200
    m = metrics(server)
    assert m["pagedserve:num_free_kv_blocks"] == m["pagedserve:num_total_kv_blocks"]


def test_a_conversation_s_turns_go_where_its_prefix_is_cached(server) -> None:
    """Cache-aware routing: the same long prompt sent four times, one after another (both replicas idle each time,
    so least-loaded routing would alternate them), lands on one replica: three prefix hits of its full blocks."""
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    prompt = list(range(1000, 1100))  # 100 tokens: 6 full blocks of 16
    before = metrics(server)
    for _ in range(4):
        r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
    after = metrics(server)
    hits = after["pagedserve:prefix_cache_hits_total"] - before["pagedserve:prefix_cache_hits_total"]
    assert hits >= 3 * 96, hits
    served = [after[f'pagedserve:replica_prompt_tokens_total{{engine="{i}"}}']
              - before[f'pagedserve:replica_prompt_tokens_total{{engine="{i}"}}'] for i in (0, 1)]
    assert sorted(served) == [0, 400], served


def test_zz_a_dead_replica_fails_its_requests_only_and_comes_back(server) -> None:
    """A replica killed mid-stream: that stream ends with an in-band replica_lost error, the server stays healthy and
    answers through the other replica, and the dead one restarts and serves again."""
    import json

    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    pids = replica_pids(server)  # in spawn order: replica 0's first
    body = {"model": model, "prompt": "# a long story\n", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        running = metrics(server)
        j = next(i for i in (0, 1) if running[f'pagedserve:replica_num_requests_running{{engine="{i}"}}'] == 1)
        os.kill(pids[j], signal.SIGKILL)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "replica_lost" and f"replica {j} died" in events[-1]["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = httpx.post(server.base_url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 180
    while metrics(server)["pagedserve:data_parallel_replicas_up"] < 2:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.5)
    assert len(replica_pids(server)) == 2 and pids[j] not in replica_pids(server)
    before = metrics(server)
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

    async def all_of():
        return await asyncio.gather(*(client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0)
                                      for p in PROMPTS))

    assert all(len(a.choices[0].text) > 0 for a in asyncio.run(all_of()))
    after = metrics(server)
    for i in (0, 1):
        key = f'pagedserve:replica_generation_tokens_total{{engine="{i}"}}'
        assert after[key] > (before[key] if i != j else 0), i


def test_zzz_a_stop_of_the_process_group_drains_without_restarting_replicas(server) -> None:
    """systemd stops a unit by sending SIGTERM to every process in it: the replicas must not die under the server's
    graceful shutdown (the supervisor would take them for crashed and restart them, and the running stream would
    fail); the stream finishes, nothing restarts, the server exits 0. Runs last: it stops the module's server."""
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "# a long story\n", "max_tokens": 24, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=180) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.killpg(server.proc.pid, signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest and not any('"error"' in line for line in rest)
    assert server.proc.wait(timeout=150) == 0
    log = server.output()
    assert "received SIGTERM" in log
    after = log.split("received SIGTERM", 1)[1]
    assert "died" not in after and "of 2 started" not in after, after
