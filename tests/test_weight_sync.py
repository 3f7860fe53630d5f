"""Weights broadcast by a trainer's process (executor/weight_sync.py: SGLang's init_weights_update_group /
update_weights_from_distributed), over gloo on CPU: a trainer in another process joins the group as rank 0 and
broadcasts a new state dict; afterwards the engine answers as Transformers with those weights (one rank, two
tensor-parallel ranks, and the server's routes); a bad update is refused after every broadcast was still received (the
trainer does not hang) and a good one works after it."""

from __future__ import annotations

import multiprocessing

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM
from pagedserve.distributed import free_port
from tests.executor.helpers import tiny_hf_model
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint
from tests.test_load_weights import KW, PROMPT, assert_as_hf


def _trainer(port: int, world_size: int, paths: list[str], names: list[str]) -> None:
    """Rank 0: joins the group, then for each file broadcasts its tensors named `names`, in that order."""
    from pagedserve.executor.weight_sync import join_group

    group = join_group("127.0.0.1", port, 0, world_size, "trainer", "gloo", timeout_s=120)
    for path in paths:
        tensors = load_file(path)
        for name in names:
            torch.distributed.broadcast(tensors[name], src=0, group=group)
    torch.distributed.destroy_process_group(group)


def start_trainer(tmp_path, states: list[dict], names: list[str]):
    paths = []
    for i, state in enumerate(states):
        paths.append(str(tmp_path / f"trainer{i}.safetensors"))
        save_file({n: state[n].contiguous() for n in names}, paths[-1])
    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(target=_trainer, args=(port, 2, paths, names))
    proc.start()
    return port, proc


def announce(state: dict, names: list[str]) -> dict:
    return {"names": names, "dtypes": [str(state[n].dtype) for n in names],
            "shapes": [list(state[n].shape) for n in names]}


@pytest.mark.parametrize("tp", [1, 2])
def test_trainer_broadcast_then_answers_as_transformers(tp, tmp_path, real_model_dir) -> None:
    hf = tiny_checkpoint(tmp_path / "model", real_model_dir, "qwen2")
    kwargs = KW if tp == 1 else dict(dtype="float32", max_model_len=64, cpu_kv_cache_gib=0.05, skip_warmup=True)
    llm = LLM(str(tmp_path / "model"), tensor_parallel_size=tp, **kwargs)
    try:
        assert_as_hf(llm, hf)
        new = tiny_hf_model("qwen2", seed=1)
        state = {k: v.to(torch.bfloat16) for k, v in new.state_dict().items()}  # as a bf16 trainer sends them
        with torch.no_grad():
            for name, p in new.named_parameters():
                p.copy_(state[name].float())
        names = sorted(state)
        # First round: one tensor of a shape the model does not have, early in the order: refused, and the tensors
        # after it are still received (the trainer's second round then lines up).
        wrong = {**state, names[1]: torch.zeros(3, 5, dtype=torch.bfloat16)}
        port, trainer = start_trainer(tmp_path, [wrong, state], names)
        llm.init_weights_update_group("127.0.0.1", port, 1, 2, "trainer")
        with pytest.raises(ValueError, match="does not match"):
            llm.update_weights_from_distributed(**announce(wrong, names), group_name="trainer")
        # Second round: the same tensors, announced right.
        assert llm.update_weights_from_distributed(**announce(state, names), group_name="trainer") == len(names)
        trainer.join(60)
        assert trainer.exitcode == 0
        assert_as_hf(llm, new)
    finally:
        llm.engine.worker.close()


def test_bad_calls_are_refused_before_anything_is_received(tmp_path, real_model_dir) -> None:
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), **KW)
    state = tiny_hf_model("qwen2").state_dict()
    with pytest.raises(ValueError, match="no weight-update group named 'nope'"):
        llm.update_weights_from_distributed(**announce(state, ["model.norm.weight"]), group_name="nope")
    with pytest.raises(ValueError, match="group_name must be a string"):
        llm.update_weights_from_distributed(**announce(state, ["model.norm.weight"]), group_name=["x"])
    for kwargs, words in ((dict(master_port=0), "master_port"), (dict(rank_offset=0), "rank_offset"),
                          (dict(world_size=1), "world_size"), (dict(rank_offset=2), "below world_size"),
                          (dict(backend="nccl"), "backend"), (dict(group_name=""), "group_name"),
                          (dict(master_address="\ud800"), "master_address")):
        args = dict(master_address="127.0.0.1", master_port=29999, rank_offset=1, world_size=2, group_name="g")
        with pytest.raises(ValueError, match=words):
            llm.init_weights_update_group(**{**args, **kwargs})
    from pagedserve.executor.weight_sync import parse_update

    for names, dtypes, shapes, words in ((["a"], ["int7"], [[1]], "dtype"), (["a"], ["float32"], [[-1]], "shape"),
                                         (["a", "b"], ["float32"], [[1]], "one length"), ([], [], [], "non-empty"),
                                         ("a", ["float32"], [[1]], "lists")):
        with pytest.raises(ValueError, match=words):
            parse_update(names, dtypes, shapes)
    assert parse_update(["a"], ["torch.bfloat16"], [[2, 3]]) == [("a", torch.bfloat16, (2, 3))]


@pytest.mark.slow
def test_server_routes(tmp_path, real_model_dir) -> None:
    """--enable-weight-updates: POST /init_weights_update_group, then /update_weights_from_distributed while the
    trainer broadcasts; the server then answers as Transformers with the trainer's weights."""
    from tests.entrypoints.conftest import RealServer

    tiny_checkpoint(tmp_path / "model", real_model_dir, "qwen2")
    server = RealServer(str(tmp_path / "model"), "--max-model-len", "128", "--cpu-kv-cache-gib", "0.05", "--dtype",
                        "float32", "--enable-weight-updates")
    try:
        new = tiny_hf_model("qwen2", seed=2)
        state = new.state_dict()
        names = sorted(state)
        port, trainer = start_trainer(tmp_path, [state], names)
        r = httpx.post(server.base_url + "/init_weights_update_group", timeout=120, json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "trainer", "backend": "gloo"})
        assert r.status_code == 200 and r.json()["success"], r.text
        r = httpx.post(server.base_url + "/update_weights_from_distributed", timeout=120,
                       json={**announce(state, names), "group_name": "trainer"})
        assert r.status_code == 200 and r.json()["success"], r.text
        trainer.join(60)
        r = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == hf_greedy(new, PROMPT, 6)[0]
        for body in ({"master_address": "127.0.0.1"}, {"master_address": "127.0.0.1", "master_port": port,
                                                       "rank_offset": 1, "world_size": 2, "bogus": 1}):
            assert httpx.post(server.base_url + "/init_weights_update_group", json=body).status_code == 400
        r = httpx.post(server.base_url + "/update_weights_from_distributed", json={"names": ["x"], "dtypes": ["x"],
                                                                                   "shapes": [[1]]})
        assert r.status_code == 400 and "dtype" in r.json()["error"]["message"]
    finally:
        server.stop()

