"""The penalties kernel against plain torch (fresh random inputs, several shapes, rows it must not touch
checked bit for bit), and the sampler's kernel path against its torch path. Interpreter on CPU, compiled
on CUDA (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.core.outputs import ScheduledRequest
from pagedserve.executor.kernels.penalties import BLOCK, apply_penalties
from pagedserve.executor.sampler import Sampler, StepHistory
from pagedserve.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def reference(logits, rows, slots, counts, in_prompt, knobs):
    out = logits.clone()
    for i, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        x, c = out[row].clone(), counts[slot]
        seen_out = c > 0
        if in_prompt is not None:
            seen = seen_out | in_prompt[slot]
            x = torch.where(seen, torch.where(x > 0, x / knobs[0, i], x * knobs[0, i]), x)
        out[row] = x - knobs[1, i] * c.float() - knobs[2, i] * seen_out.float()
    return out


@pytest.mark.parametrize("vocab", [5, 300, BLOCK, BLOCK + 1, 3 * BLOCK - 7])
@pytest.mark.parametrize(("num_logits", "row_list", "capacity"), [(1, [0], 1), (6, [4, 1, 5], 9), (3, [2, 0, 1], 3)])
@pytest.mark.parametrize("with_prompt", [True, False])
def test_kernel_matches_torch(vocab, num_logits, row_list, capacity, with_prompt) -> None:
    g = torch.Generator().manual_seed(vocab * 31 + num_logits * 7 + capacity + with_prompt)
    logits = (torch.randn(num_logits, vocab, generator=g) * 4).to(DEVICE)
    num = len(row_list)
    rows = torch.tensor(row_list, device=DEVICE)
    slots = torch.randperm(capacity, generator=g)[:num].to(DEVICE)
    counts = (torch.randint(0, 4, (capacity, vocab), generator=g) * (torch.rand(capacity, vocab, generator=g) < 0.3)
              ).to(torch.int32)
    counts[:, 0] = 1  # every row has something to change
    counts = counts.to(DEVICE)
    in_prompt = (torch.rand(capacity, vocab, generator=g) < 0.2).to(DEVICE) if with_prompt else None
    knobs = torch.stack([torch.rand(num, generator=g) * 1.5 + 0.5, torch.rand(num, generator=g) * 4 - 2,
                         torch.rand(num, generator=g) * 4 - 2]).to(DEVICE)
    want = reference(logits, rows, slots, counts, in_prompt, knobs)
    got = logits.clone()
    apply_penalties(got, rows, slots, counts, in_prompt, knobs)
    touched = sorted(set(row_list))
    torch.testing.assert_close(got[touched], want[touched], rtol=1e-6, atol=1e-5)
    assert (got[touched] != logits[touched]).any()  # it did change something
    untouched = [r for r in range(num_logits) if r not in touched]
    assert torch.equal(got[untouched], logits[untouched])  # bit for bit


def test_bad_inputs_raise_value_error() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    rows = torch.tensor([0, 1], device=DEVICE)
    counts = torch.zeros(2, 10, dtype=torch.int32, device=DEVICE)
    knobs = torch.ones(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be fp32"):
        apply_penalties(logits.half(), rows, rows, counts, None, knobs)
    with pytest.raises(ValueError, match="disagree"):
        apply_penalties(logits, rows, rows[:1], counts, None, knobs)
    with pytest.raises(ValueError, match="counts must be"):
        apply_penalties(logits, rows, rows, counts.long(), None, knobs)
    with pytest.raises(ValueError, match="in_prompt"):
        apply_penalties(logits, rows, rows, counts, torch.zeros(2, 9, dtype=torch.bool, device=DEVICE), knobs)


def test_sampler_kernel_path_equals_torch_path(monkeypatch) -> None:
    """process_logits with a StepHistory on the kernel path (PenaltyHistory rows read in place) gives the torch
    path's values, over steps whose newest token is only in the last step's samples."""
    vocab = 700
    g = torch.Generator().manual_seed(3)
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4), SamplingParams(temperature=0.5),
              SamplingParams(presence_penalty=-0.7, repetition_penalty=0.8), SamplingParams(frequency_penalty=2.0)]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 40, 1, 12)]
    outputs: list[list[int]] = [[] for _ in params]
    fused, plain = Sampler(vocab, {5}), Sampler(vocab, {5})
    monkeypatch.setattr(fused, "_fused_kernel_on", lambda logits: True)
    last, last_rows = None, {}
    for step in range(6):
        reqs, full = [], []
        for i, p in enumerate(params):
            pending = [int(last[i])] if last is not None else []
            index = len(outputs[i]) + len(pending)
            reqs.append(ScheduledRequest(str(i), [0], 0, [0], True, p, prompts[i], outputs[i], index))
            full.append(ScheduledRequest(str(i), [0], 0, [0], True, p, prompts[i], outputs[i] + pending, index))
        logits = (torch.randn(len(params), vocab, generator=g) * 3).to(DEVICE)
        got = fused.process_logits(logits, reqs, StepHistory(last, last_rows))
        want = plain.process_logits(logits, full)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        assert torch.equal(got[1], logits[1])  # the row without penalties is untouched
        if step:
            assert not torch.equal(got[3], logits[3])
        for i in range(len(params)):
            outputs[i].extend(full[i].output_token_ids[len(outputs[i]):])
        last = torch.randint(0, vocab, (len(params),), generator=g).to(DEVICE)
        last_rows = {str(i): i for i in range(len(params))}
    assert fused._penalty_history is not None and len(fused._penalty_history.entries) == 3
