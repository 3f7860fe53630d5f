"""Mixed-step CUDA graphs (executor/mixed_graph.py) end to end through the runner, Triton backend: on a
GPU the graphs are captured and replayed; on CPU (the interpreter) the same padded forward runs eagerly,
so the padding rules are checked everywhere: padded tokens write no KV, padded sequences (no new
tokens, seq_len 0) are skipped by both attention kernels, stale rows of a larger earlier step change
nothing. Logits are compared with Hugging Face's for every sampled row. Lives with the kernel tests,
whose conftest turns the interpreter on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.core.outputs import ScheduledRequest
from pagedserve.executor.mixed_graph import CUDAGraphMixed, mixed_token_ladder
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 5e-3 if CUDA else 1e-4


def test_ladder_and_fits() -> None:
    assert mixed_token_ladder(1024)[:5] == [16, 32, 64, 96, 128] and mixed_token_ladder(1024)[-1] == 1024
    assert mixed_token_ladder(100) == [16, 32, 64, 96]
    graphs = CUDAGraphMixed(torch.nn.Identity(), [], None, max_num_seqs=8, max_model_len=64, block_size=4,
                            device=torch.device("cpu"), max_tokens=32)
    assert graphs.sizes == [16, 32] and graphs.num_seqs_of(16) == 8 and graphs.padded_size(17) == 32
    assert graphs.fits(32, 8, 16) and not graphs.fits(33, 1, 1)  # too many tokens
    assert not graphs.fits(20, 9, 1) and not graphs.fits(20, 2, 17)  # too many sequences; too wide
    with pytest.raises(ValueError):
        CUDAGraphMixed(torch.nn.Identity(), [], None, 8, 64, 4, torch.device("cpu"), max_tokens=8)


def _attach_graphs(runner, max_num_seqs: int, max_tokens: int) -> CUDAGraphMixed:
    graphs = CUDAGraphMixed(runner.model, runner.kv_caches, runner.backend, max_num_seqs, max_model_len=128,
                            block_size=runner.block_size, device=runner.device, max_tokens=max_tokens,
                            num_window_groups=runner.num_window_groups)
    if CUDA and runner.backend.capturable:  # (the torch backend: eager on a GPU too, as on the CPU)
        graphs.capture()
        assert sorted(graphs.graphs) == graphs.sizes
    runner.mixed_graphs = graphs
    return graphs


def test_mixed_steps_through_graphs_match_hf(tmp_path) -> None:
    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=2)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=96, device=DEVICE, dtype=torch.float32,
                                  attention_backend="triton")
    _attach_graphs(runner, max_num_seqs=6, max_tokens=32)
    rng = np.random.default_rng(1)
    prompts = {"a": rng.integers(1, 250, 11).tolist(), "b": rng.integers(1, 250, 6).tolist(),
               "c": rng.integers(1, 250, 13).tolist()}
    blocks = {"a": list(range(1, 9)), "b": list(range(9, 17)), "c": list(range(17, 25)),
              "d": [1, 2] + list(range(25, 31))}  # d's first two blocks are a's (a prefix hit)
    seqs = {rid: list(p) for rid, p in prompts.items()}

    def check(out_step, expect_graph: bool, sampled: list[str]) -> None:
        assert runner.prepare_inputs(out_step).mixed_graph_step == expect_graph
        out = runner.execute(out_step)
        rows = sampler.logits[-1]
        assert sorted(rows) == sorted(sampled)
        for rid in sampled:
            assert max_rel_err(rows[rid], hf_logits(hf, seqs[rid])[-1]) < TOL, rid
        for rid, token in zip([r.request_id for r in out_step.scheduled], out.sampled_token_ids):
            if token is not None:
                seqs[rid].append(token)

    # 1. Two whole prompts and the first 8 tokens of "c" (a chunk that does not sample): 25 tokens -> the
    #    32-token graph, 3 of its 6 sequence slots.
    check(step(scheduled("a", prompts["a"], 0, blocks["a"], True),
               scheduled("b", prompts["b"], 0, blocks["b"], True),
               scheduled("c", prompts["c"][:8], 0, blocks["c"], False)), True, ["a", "b"])
    # 2. Decodes of a and b beside the rest of c (5 tokens, on 8 cached) and "d", a new request whose first
    #    8 tokens are a's (a prefix hit on a's blocks 1-2): 1 + 1 + 5 + 3 = 10 tokens -> the 16-token graph,
    #    after a larger step left stale rows in every buffer.
    seqs["d"] = prompts["a"][:8] + rng.integers(1, 250, 3).tolist()
    check(step(scheduled("a", seqs["a"][-1:], len(seqs["a"]) - 1, blocks["a"], True),
               scheduled("b", seqs["b"][-1:], len(seqs["b"]) - 1, blocks["b"], True),
               scheduled("c", prompts["c"][8:], 8, blocks["c"], True, prompts["c"]),
               scheduled("d", seqs["d"][8:], 8, blocks["d"], True, seqs["d"])), True, ["a", "b", "c", "d"])
    # 3. A step with more tokens than the largest graph runs eagerly (and still matches).
    e_prompt = rng.integers(1, 250, 40).tolist()
    seqs["e"] = e_prompt
    check(step(scheduled("e", e_prompt, 0, list(range(31, 43)), True),
               scheduled("a", seqs["a"][-1:], len(seqs["a"]) - 1, blocks["a"], True)), False, ["e", "a"])
    # 4. Decodes of all five (decode-only: not a mixed step) then one more mixed step through a graph.
    check(step(*(scheduled(r, seqs[r][-1:], len(seqs[r]) - 1, b, True)
                 for r, b in [("a", blocks["a"]), ("b", blocks["b"]), ("c", blocks["c"]), ("d", blocks["d"]),
                              ("e", list(range(31, 43)))])), False, ["a", "b", "c", "d", "e"])
    seqs["f"] = rng.integers(1, 250, 4).tolist()
    check(step(scheduled("f", seqs["f"], 0, list(range(43, 45)), True),
               scheduled("b", seqs["b"][-1:], len(seqs["b"]) - 1, blocks["b"], True)), True, ["f", "b"])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hybrid_model_steps_read_their_groups_tables(backend: str, tmp_path) -> None:
    """A hybrid model (Qwen2: layer 0 full attention, layers 1 and 2 window 6) in three groups of one layer sharing
    one KV tensor (model_runner.KVLayout): each windowed layer writes and reads through its own group's table (ids
    unlike the full table's and each other's), through mixed graphs, eager steps and decode-only steps; table entries
    behind the window point at a block of NaN, which must never be read. Logits as Hugging Face's at every sampled
    row."""
    from pagedserve.executor.model_runner import KVLayout

    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
                         max_window_layers=1)
    layout = KVLayout(96, 6, 2, (0, 1, 2), (0, 0, 0), 1)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=96, device=DEVICE, dtype=torch.float32,
                                  attention_backend=backend, layout=layout)
    assert runner.kv_caches[0] is runner.kv_caches[2] and tuple(runner.kv_caches[0].shape[:2]) == (2, 96)
    assert [layer.self_attn.kv_group for layer in runner.model.model.layers] == [0, 1, 2]
    _attach_graphs(runner, max_num_seqs=6, max_tokens=32)
    runner.kv_caches[0][:, 0] = float("nan")  # block 0: what the window tables point at behind the window
    rng = np.random.default_rng(2)
    ids = (rng.permutation(95) + 1).tolist()  # every block but 0, shuffled: each table takes its own
    seqs = {"a": rng.integers(1, 250, 11).tolist(), "b": rng.integers(1, 250, 14).tolist(),
            "c": rng.integers(1, 250, 37).tolist()}
    full = {r: [ids.pop() for _ in range(10)] for r in seqs}
    window = {r: [[ids.pop() for _ in range(10)] for _ in range(2)] for r in seqs}

    def run(expect_graph: bool, *rows: ScheduledRequest) -> None:
        out_step = step(*rows)
        for r in out_step.scheduled:
            # entries wholly behind the window of the step's first token: the NaN block
            first = max(0, r.num_computed_tokens - 6 + 1) // 4
            r.window_block_ids = [[0] * first + table[first:] for table in window[r.request_id]]
        inputs = runner.prepare_inputs(out_step)
        assert inputs.mixed_graph_step == expect_graph
        # every group's slots start 16-byte aligned (Triton specializes on it: no new kernel variant mid-serving)
        assert [w.slot_mapping.data_ptr() % 16 for w in inputs.ctx.attn_metadata.windows] == [0, 0]
        out = runner.execute(out_step)
        sampled = [r.request_id for r in out_step.scheduled if r.needs_sample]
        assert sorted(sampler.logits[-1]) == sorted(sampled)
        for rid in sampled:
            assert max_rel_err(sampler.logits[-1][rid], hf_logits(hf, seqs[rid])[-1]) < TOL, rid
        for rid, token in zip([r.request_id for r in out_step.scheduled], out.sampled_token_ids):
            if token is not None:
                seqs[rid].append(token)

    # 1. a whole, b's first 8 tokens (no sample): 19 tokens, the 32-token graph
    run(True, scheduled("a", seqs["a"], 0, full["a"], True), scheduled("b", seqs["b"][:8], 0, full["b"], False))
    # 2. a decodes (position 11 attends to 6..11: its tables' entry 0 is the NaN block), b's other 6 tokens
    run(True, scheduled("a", seqs["a"][-1:], 11, full["a"], True),
        scheduled("b", seqs["b"][8:], 8, full["b"], True, seqs["b"]))
    # 3. decode-only steps (the decode kernel), past a block boundary
    for _ in range(3):
        run(False, *(scheduled(r, seqs[r][-1:], len(seqs[r]) - 1, full[r], True) for r in ("a", "b")))
    # 4. a step larger than the largest graph (eager), beside a decode
    run(False, scheduled("c", seqs["c"], 0, full["c"], True),
        scheduled("a", seqs["a"][-1:], len(seqs["a"]) - 1, full["a"], True))
    # graphs captured without the window groups refuse a hybrid step (they would write the windowed layers' K/V
    # through the full table), and the other way round
    one_table = CUDAGraphMixed(runner.model, runner.kv_caches, runner.backend, 6, max_model_len=128, block_size=4,
                               device=runner.device, max_tokens=32)
    rows = step(scheduled("a", seqs["a"][-1:], len(seqs["a"]) - 1, full["a"], True))
    rows.scheduled[0].window_block_ids = [table[:] for table in window["a"]]
    inputs = runner.prepare_inputs(rows)
    with pytest.raises(ValueError, match="this step has 2"):
        one_table.run(inputs.input_ids, inputs.positions, inputs.ctx.attn_metadata, inputs.logits_indices, 1)
    inputs.ctx.attn_metadata.windows = None
    with pytest.raises(ValueError, match="this step has 0"):
        runner.mixed_graphs.run(inputs.input_ids, inputs.positions, inputs.ctx.attn_metadata, inputs.logits_indices, 1)


def test_a_backend_that_cannot_be_captured_runs_eagerly(tmp_path, caplog) -> None:
    """The torch reference backend syncs with the host (boolean-mask indexing): on a GPU its steps cannot be
    captured (capture failed with cudaErrorStreamCaptureUnsupported), so the runner keeps them eager."""
    import logging

    save_tiny_model("qwen2", tmp_path, num_hidden_layers=1)
    runner, _ = make_runner(tmp_path, block_size=4, num_blocks=16, device=DEVICE, dtype=torch.float32,
                            attention_backend="torch")
    assert not runner.backend.capturable
    with caplog.at_level(logging.WARNING):
        assert runner.capture_cuda_graphs(4, 64, 32) == 0.0
    assert runner.cuda_graphs is None and runner.mixed_graphs is None
    assert "cannot be captured in CUDA graphs" in caplog.text
