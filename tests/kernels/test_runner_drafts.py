"""Speculative decoding's drafted steps through the runner with the Triton backend (the interpreter on CPU): a request
with drafts becomes one attention sequence a token (each seeing the keys up to its own position), so a step of decodes
and drafts is decode-only and runs the decode kernel; beside a prefill it runs the mixed-step graph. Every logits row
(one per drafted token and one per plain decode) is compared with Hugging Face's at that position, including after
rejected drafts' cache slots were written over by the next step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from pagedserve.executor.mixed_graph import CUDAGraphMixed
from pagedserve.executor.sampler import SampleResult
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 5e-3 if CUDA else 1e-4


class RowSampler:
    """Keeps every logits row in order, as (request id, row)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, torch.Tensor]] = []

    def sample(self, logits: torch.Tensor, requests: Sequence, history=None) -> SampleResult:
        assert logits.shape[0] == len(requests)
        self.rows = [(r.request_id, logits[i].float().cpu()) for i, r in enumerate(requests)]
        ids = logits.argmax(dim=-1)
        return SampleResult(ids, ids, lambda values: (values, [None] * len(values)))


def drafted(request_id: str, seq: list[int], num_computed: int, blocks: list[int], drafts: list[int]):
    """A decode of seq[num_computed] (its last known token) followed by `drafts`."""
    r = scheduled(request_id, [seq[num_computed], *drafts], num_computed, blocks, True, seq)
    return dataclasses.replace(r, draft_token_ids=list(drafts))


def test_drafted_steps_match_hf_row_by_row(tmp_path) -> None:
    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=2)
    runner, _ = make_runner(tmp_path, block_size=4, num_blocks=64, device=DEVICE, dtype=torch.float32,
                            attention_backend="triton")
    sampler = runner.sampler = RowSampler()
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(1, 250, n).tolist() for n in (11, 6, 9))
    blocks = {"a": list(range(1, 9)), "b": list(range(9, 17)), "c": list(range(17, 25))}

    def check(out_step, expected: list[tuple[str, list[int]]]) -> None:
        """expected: per logits row, the request and the sequence whose last position it is."""
        runner.execute(out_step)
        assert [rid for rid, _ in sampler.rows] == [rid for rid, _ in expected]
        for (rid, row), (_, seq) in zip(sampler.rows, expected, strict=True):
            assert max_rel_err(row, hf_logits(hf, seq)[-1]) < TOL, (rid, len(seq))

    # 1. Prefill a and b.
    check(step(scheduled("a", a, 0, blocks["a"], True), scheduled("b", b, 0, blocks["b"], True)),
          [("a", a), ("b", b)])
    # 2. Decode-only with drafts: a's next token and 3 drafts, b's and 2 drafts: 7 attention sequences of one token.
    a += [17]
    b += [42]
    da, db = [5, 99, 23], [7, 7]
    inputs = runner.prepare_inputs(step(drafted("a", a, len(a) - 1, blocks["a"], da),
                                        drafted("b", b, len(b) - 1, blocks["b"], db)))
    meta = inputs.ctx.attn_metadata
    assert meta.is_decode_only and meta.query_lens_cpu == [1] * 7
    assert meta.seq_lens_cpu == [len(a) + j for j in range(4)] + [len(b) + j for j in range(3)]
    assert inputs.num_logits == 7 and not inputs.mixed_graph_step
    check(step(drafted("a", a, len(a) - 1, blocks["a"], da), drafted("b", b, len(b) - 1, blocks["b"], db)),
          [("a", a + da[:j]) for j in range(4)] + [("b", b + db[:j]) for j in range(3)])
    # 3. a kept its first draft (the other two slots are stale), b kept none; with mixed graphs attached, c's
    #    prefill beside them: a mixed step, drafted rows and the prefill's last row.
    graphs = CUDAGraphMixed(runner.model, runner.kv_caches, runner.backend, max_num_seqs=16, max_model_len=128,
                            block_size=runner.block_size, device=runner.device, max_tokens=32)
    if CUDA:
        graphs.capture()
    runner.mixed_graphs = graphs
    a += [da[0], 61]
    b += [88]
    da, db = [3, 4], [9]
    out_step = step(drafted("a", a, len(a) - 1, blocks["a"], da), scheduled("c", c, 0, blocks["c"], True),
                    drafted("b", b, len(b) - 1, blocks["b"], db))
    assert runner.prepare_inputs(out_step).mixed_graph_step
    check(out_step, [("a", a + da[:j]) for j in range(3)] + [("c", c)] + [("b", b + db[:j]) for j in range(2)])
    # 4. A plain decode-only step after it (no drafts): one sequence a request again.
    a += [da[0], da[1], 12]
    check(step(scheduled("a", a[-1:], len(a) - 1, blocks["a"], True),
               scheduled("c", [30], len(c), blocks["c"], True, c + [30])), [("a", a), ("c", c + [30])])
