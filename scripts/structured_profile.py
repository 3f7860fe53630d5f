"""Where an all-constrained decode step's extra time goes (GPU): the same 64 requests plain and JSON-constrained
(as scripts/structured_cost.py), each under torch.profiler, printing the device time by kernel and the host time
of the structured-output functions.

    python scripts/structured_profile.py --model .devcache/qwen2-7b
"""

from __future__ import annotations

import torch
from dummy_workload import load_workload, workload_parser
from torch.profiler import ProfilerActivity, profile

from pagedserve import SamplingParams

STRINGS = {"json": {"type": "array", "items": {"type": "string"}}, "disable_any_whitespace": True}


def main() -> None:
    ap = workload_parser(requests=64, input_len=256)
    ap.add_argument("--output-len", type=int, default=48)
    args = ap.parse_args()
    llm, prompts = load_workload(args)

    def params(constrained: bool) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True,
                               structured_outputs=STRINGS if constrained else None) for i in range(args.requests)]

    llm.generate(prompts, params(True), use_tqdm=False)  # warm: compiles, the pinned pool, the fill threads
    for name in ("plain", "constrained"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params(name == "constrained"), use_tqdm=False)
        torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"== {name}: device time by op (top 14, us total over the run)")
        rows = sorted(events, key=lambda e: -e.device_time_total)[:14]
        for e in rows:
            print(f"  {e.device_time_total:10.0f}  {e.count:6d}  {e.key[:90]}")
        print(f"== {name}: host time of selected functions (us total, calls)")
        for e in sorted(events, key=lambda e: -e.cpu_time_total):
            if any(k in e.key for k in ("fill", "bitmask", "stack", "index_copy", "index_select", "masked_fill",
                                        "pin_memory", "aten::to", "aten::copy_", "cudaHostAlloc", "cudaMemcpyAsync",
                                        "cudaStreamSynchronize", "cudaEventSynchronize")):
                print(f"  {e.cpu_time_total:10.0f}  {e.count:6d}  {e.key[:90]}")


if __name__ == "__main__":
    main()
