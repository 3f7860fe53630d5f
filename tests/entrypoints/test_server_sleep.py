"""Sleep mode and weight updates over HTTP, on a tiny checkpoint served in a subprocess (`--enable-sleep-mode
--enable-weight-updates`): POST /sleep, /wake_up, GET /is_sleeping, POST /update_weights_from_disk. While asleep
requests get a 503 engine_sleeping and the server stays healthy; after waking the answers are Transformers' (the old
weights after level 1, the folder's after level 2 and an update); bad calls get 400s; without the flags the routes
are not there."""

from __future__ import annotations

import httpx
import pytest

from tests.entrypoints.conftest import RealServer
from tests.executor.helpers import tiny_hf_model
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 99, 3, 250, 42, 7]
FLAGS = ("--max-model-len", "128", "--cpu-kv-cache-gib", "0.05", "--dtype", "float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_model_dir):
    folder = tmp_path_factory.mktemp("sleep-server")
    hf = tiny_checkpoint(folder / "model", real_model_dir, "qwen2")
    server = RealServer(str(folder / "model"), *FLAGS, "--enable-sleep-mode", "--enable-weight-updates")
    yield folder, hf, server
    server.stop()


def greedy(server: RealServer) -> list[int]:
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def post(server: RealServer, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=60, **kwargs)


def is_sleeping(server: RealServer) -> bool:
    return httpx.get(server.base_url + "/is_sleeping").json()["is_sleeping"]


def sleep_state(server: RealServer) -> str:
    """The sleep_state label whose pagedserve:engine_sleep_state sample is 1."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        if family.name == "pagedserve:engine_sleep_state":
            (on,) = [s.labels["sleep_state"] for s in family.samples if s.value == 1]
            return on
    raise AssertionError("no pagedserve:engine_sleep_state")


def test_sleep_wake_and_new_weights(setup) -> None:
    folder, hf, server = setup
    assert not is_sleeping(server)
    assert greedy(server) == hf_greedy(hf, PROMPT, 6)[0]

    assert 'pagedserve:engine_sleep_state{model_name="' in httpx.get(server.base_url + "/metrics").text
    assert sleep_state(server) == "awake"
    r = post(server, "/sleep", params={"level": "1"})
    assert r.status_code == 200 and r.json()["is_sleeping"] and is_sleeping(server)
    assert sleep_state(server) == "weights_offloaded"
    r = post(server, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_sleeping" and "Retry-After" in r.headers
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = post(server, "/wake_up")
    assert r.status_code == 200 and not r.json()["is_sleeping"] and not is_sleeping(server)
    assert greedy(server) == hf_greedy(hf, PROMPT, 6)[0]

    new = tiny_hf_model("qwen2", seed=1)
    new.save_pretrained(folder / "new")
    assert post(server, "/sleep", params={"level": "2"}).status_code == 200
    assert sleep_state(server) == "discard_all"
    r = post(server, "/wake_up", params={"tags": "weights"})
    assert r.status_code == 200 and r.json()["is_sleeping"]  # the cache still sleeps
    r = post(server, "/update_weights_from_disk", json={"model_path": str(folder / "new")})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert post(server, "/wake_up", params={"tags": ["kv_cache"]}).json()["is_sleeping"] is False
    want = hf_greedy(new, PROMPT, 6)[0]
    assert want != hf_greedy(hf, PROMPT, 6)[0] and greedy(server) == want
    # Awake: an update straight away (the old folder back).
    assert post(server, "/update_weights_from_disk", json={"model_path": str(folder / "model")}).status_code == 200
    assert greedy(server) == hf_greedy(hf, PROMPT, 6)[0]


@pytest.mark.parametrize("path, kwargs, param", [
    ("/sleep", {"params": {"level": "3"}}, "level"),
    ("/sleep", {"params": {"level": "one"}}, "level"),
    ("/wake_up", {"params": {"tags": "weight"}}, "tags"),
    ("/update_weights_from_disk", {"json": {"model_path": "/no/such/folder"}}, "model_path"),
    ("/update_weights_from_disk", {"json": {}}, "model_path"),
    ("/update_weights_from_disk", {"json": {"model_path": 3}}, "model_path"),
    ("/update_weights_from_disk", {"json": {"model_path": ".", "load_format": "gguf"}}, "load_format"),
    ("/update_weights_from_disk", {"content": b"{not json"}, None),
])
def test_bad_calls_get_400(setup, path, kwargs, param) -> None:
    _, hf, server = setup
    r = post(server, path, **kwargs)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not is_sleeping(server) and greedy(server) == hf_greedy(hf, PROMPT, 6)[0]


def test_routes_need_the_flags(tmp_path, real_model_dir) -> None:
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    server = RealServer(str(tmp_path), *FLAGS)
    try:
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                             ("POST", "/update_weights_from_disk")):
            assert httpx.request(method, server.base_url + path, json={}).status_code == 404, path
    finally:
        server.stop()
