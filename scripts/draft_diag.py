"""GPU diagnosis of session 30's miss: a checkpoint drafting for itself kept 36% of its drafts on the GPU (CPU: 100%).
Runs the GPU test's workload (a small random Qwen2, 12 looping prompts, 40 greedy tokens, k = 4) with the draft model
under several settings and prints what each kept, by draft position, and whether the answers equal the plain
engine's. The setting whose acceptance recovers names the part at fault (decode graphs, mixed graphs, async steps)."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.gpu.helpers import small_checkpoint  # noqa: E402
from tests.gpu.test_spec_decode_gpu import looping_prompts  # noqa: E402


def main() -> None:
    from pagedserve import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp())
    small_checkpoint(folder, seed=6, std=0.02)
    prompts = [{"prompt_token_ids": p} for p in looping_prompts(3, 12)]
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0)
    spec = {"method": "draft_model", "model": str(folder), "num_speculative_tokens": 4}
    eager = {"speculative_config": spec, "enforce_eager": True}
    settings = {
        "plain": ({}, {}),
        "default": ({"speculative_config": spec}, {}),  # graphs, async
        "async-off": ({"speculative_config": spec, "async_scheduling": False}, {}),
        "no-mixed-graphs": ({"speculative_config": spec}, {"PAGEDSERVE_MIXED_GRAPHS": "0"}),
        "eager": (eager, {}),
        "eager-torch-attention": (eager | {"attention_backend": "torch"}, {}),
        "eager-plain-order": (eager, {"PAGEDSERVE_DECODE_ORDER": "0", "PAGEDSERVE_DECODE_WORK": "0"}),
        "eager-one-split": (eager, {"PAGEDSERVE_DECODE_SPLITS": "1"}),
    }
    # (PAGEDSERVE_PDL and PAGEDSERVE_FUSED_ROPE_KV are read at import: set them for the whole process.)
    names = sys.argv[1:] or ["plain", "default", "async-off", "no-mixed-graphs", "eager"]
    want = None
    for name in names:
        kwargs, env = settings[name]
        os.environ.update(env)
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(str(folder), dtype="float32", max_model_len=1024, gpu_memory_utilization=0.25, **kwargs)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.engine.get_stats().get("spec_decode") or {}
        if want is None:
            want = outs
        same = sum(a == b for a, b in zip(outs, want))
        flags = " ".join(f"{k}={v}" for k, v in os.environ.items()
                         if k in ("PAGEDSERVE_PDL", "PAGEDSERVE_FUSED_ROPE_KV"))
        print(f"draft-diag {name} {flags}: answers equal to the first setting's {same}/12; "
              f"drafts {stats.get('num_drafts')}, kept "
              f"{stats.get('num_accepted_tokens')} of {stats.get('num_draft_tokens')}, by position "
              f"{stats.get('accepted_per_position')}", flush=True)
        for key in env:
            os.environ.pop(key)
        del llm


if __name__ == "__main__":
    main()
