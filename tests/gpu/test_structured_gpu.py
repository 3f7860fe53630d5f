"""GPU: structured outputs through the CUDA sampler paths (greedy argmax, the fused random kernel, the
top-k/top-p threshold kernel, penalties) with CUDA graphs and async scheduling on, on a small random-weight
Qwen2 with the 7B config's tokenizer (.devcache/qwen2-7b): random weights prefer nothing, so only the
token masks keep the outputs valid."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.gpu.test_async_gpu import small_model_dir  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "kind": {"enum": ["a", "b"]},
                                           "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
          "required": ["id", "kind", "flags"], "additionalProperties": False}


def test_constraints_hold_on_every_cuda_sampler_path(small_model_dir: str) -> None:  # noqa: F811
    from pagedserve import LLM, SamplingParams

    llm = LLM(small_model_dir, load_format="dummy", max_model_len=1024, gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling
    kinds = [
        ({"json": SCHEMA, "disable_any_whitespace": True}, lambda t: json.loads(t)["kind"] in ("a", "b")),
        ({"regex": r"[0-9]{2,4}(-[a-f]{3})?"}, lambda t: re.fullmatch(r"[0-9]{2,4}(-[a-f]{3})?", t)),
        ({"choice": ["north", "south", "east", "west"]}, lambda t: t in ("north", "south", "east", "west")),
        ({"grammar": 'root ::= "<" [a-z] [a-z]? [a-z]? ">"'}, lambda t: re.fullmatch(r"<[a-z]{1,3}>", t)),
    ]
    samplings = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, top_k=50),
                 dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5), dict(temperature=1.0, seed=3)]
    params, checks = [], []
    for k, (spec, check) in enumerate(kinds):
        for j, s in enumerate(samplings):
            params.append(SamplingParams(max_tokens=120, structured_outputs=spec, **{"seed": 10 * k + j, **s}))
            checks.append(check)
    # Plain requests beside them, which run in the same (one-at-a-time) steps.
    params += [SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0, seed=100 + i) for i in range(12)]
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for out, check in zip(outs, checks):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop" and check(text), (text, out.outputs[0].finish_reason)
    assert all(len(o.outputs[0].token_ids) == 64 for o in outs[len(checks):])
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
