"""Server flags of vLLM's, on the embedded model in a subprocess listening on a Unix domain socket (--uds):
--enable-prompt-tokens-details (usage.prompt_tokens_details.cached_tokens, whole and streamed, equal to the prefix
cache's hits), --response-role, --disable-fastapi-docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PROMPT = "def quicksort(items):\n    " * 12  # 100+ tokens: several full blocks to find in the cache


@pytest.fixture(scope="module")
def server(real_model_dir, tmp_path_factory):
    uds = str(tmp_path_factory.mktemp("uds") / "pagedserve.sock")
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.openai", real_model_dir, "--uds", uds,
                             "--max-model-len", "1024", "--cpu-kv-cache-gib", "0.25", "--enable-prompt-tokens-details",
                             "--response-role", "bot", "--disable-fastapi-docs", "--log-level", "INFO"],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://pagedserve", timeout=120)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"server exited: {log.seek(0) or log.read().decode(errors='replace')}"
        if os.path.exists(uds):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.25)
    yield client
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    log.close()
    assert not os.path.exists(uds), "the Unix socket file outlived the server"


def test_cached_tokens_in_usage(server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    first = server.post("/v1/completions", json=body).json()["usage"]
    again = server.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert again["prompt_tokens"] - 16 <= cached < again["prompt_tokens"] and cached % 16 == 0  # whole blocks
    lines = server.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
                        ).text.splitlines()
    usage = [line for line in lines if '"usage": {' in line or '"usage":{' in line][-1]
    assert f'"cached_tokens": {cached}' in usage or f'"cached_tokens":{cached}' in usage


def test_cached_tokens_of_siblings_and_beams(server) -> None:
    # n > 1: the siblings find the blocks the first one computes, which is no cache hit; a new prompt reports 0.
    prompt = "class LinkedList:\n    " * 12
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 1.0, "seed": 1}
    first = server.post("/v1/completions", json={**body, "n": 3}).json()
    assert len(first["choices"]) == 3 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = server.post("/v1/completions", json={**body, "n": 3}).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= again["prompt_tokens"] - 16
    # Beam search: the first step's hit, in the completion and the chat routes, streamed too.
    beam = {"prompt": "import numpy as np\n" * 10, "max_tokens": 2, "n": 2, "use_beam_search": True, "temperature": 0}
    cold = server.post("/v1/completions", json=beam).json()["usage"]
    warm = server.post("/v1/completions", json=beam).json()["usage"]
    assert cold["prompt_tokens_details"] == {"cached_tokens": 0}
    assert warm["prompt_tokens"] - 16 <= warm["prompt_tokens_details"]["cached_tokens"] < warm["prompt_tokens"]
    chat = {"messages": [{"role": "user", "content": "Explain. " + prompt}], "max_tokens": 2, "n": 2,
            "use_beam_search": True, "temperature": 0}
    server.post("/v1/chat/completions", json=chat)
    lines = server.post("/v1/chat/completions", json={**chat, "stream": True,
                                                      "stream_options": {"include_usage": True}}).text.splitlines()
    usage = json.loads([line for line in lines if '"usage"' in line][-1][len("data: "):])["usage"]
    assert usage["prompt_tokens"] - 16 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_response_role_and_chat_usage(server) -> None:
    # The official client over the socket: the chat answer's role is --response-role's, usage has the details.
    client = openai.OpenAI(base_url="http://pagedserve/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=server._transport))
    messages = [{"role": "user", "content": "Say hi. " + PROMPT}]
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "bot"
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 96
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "bot"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 96


def test_docs_are_off(server) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.get(path).status_code == 404, path
    assert server.get("/v1/models").status_code == 200
