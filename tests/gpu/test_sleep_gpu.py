"""GPU: sleep mode with CUDA graphs and the Triton kernels. Level 1 hands the weights' and the KV cache's memory back
to the driver (cudaMemGetInfo sees it) and waking up recaptures the graphs: the same greedy tokens as before; level 2
and the same weights loaded again: the same tokens once more; answers stay within the usual bound of Transformers'."""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.helpers import logprob_errors_against, small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def greedy(llm, seed: int = 0) -> list[list[int]]:
    from pagedserve import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(5, 200))] for _ in range(24)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_sleep_frees_device_memory_and_wakes_the_same(tmp_path) -> None:
    from pagedserve import LLM

    hf = small_checkpoint(tmp_path, seed=6, std=0.02)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3)
    runner = llm.engine.worker.runner
    assert runner.cuda_graphs is not None
    want = greedy(llm)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    freed = llm.sleep(1)
    free_asleep = torch.cuda.mem_get_info()[0]
    print(f"sleep level 1: {freed / 2**30:.2f} GiB freed by the runner, the driver's free memory "
          f"+{(free_asleep - free_before) / 2**30:.2f} GiB")
    assert free_asleep - free_before >= 0.9 * freed
    assert runner.cuda_graphs is None
    llm.wake_up()
    assert runner.cuda_graphs is not None and runner.mixed_graphs is not None  # captured again
    assert greedy(llm) == want

    llm.sleep(2)
    llm.wake_up(["weights"])
    llm.load_weights({n: t.to(torch.float32) for n, t in hf.state_dict().items()})
    llm.wake_up(["kv_cache"])
    assert greedy(llm) == want
    hf.to("cuda")
    errors = logprob_errors_against(llm, hf, seed=1, max_prompt=300)
    print(f"after level 2 and new weights: worst logprob error {max(errors):.2e} over {len(errors)}")
    assert max(errors) < 2e-3
