"""What prompt logprobs cost, on the 7B shapes with random weights (GPU): lm-eval-harness's loglikelihood
workload (prompts scored, one token generated) without prompt logprobs, with the prompt token's own logprob
(k = 0), with the likeliest token too (k = 1, lm-eval's echo + logprobs=1), and with the top 5. Each prompt
row then also runs the LM head and a log-softmax over the vocabulary, in slices of max_num_seqs rows.

    python scripts/prompt_logprobs_cost.py --model .devcache/qwen2-7b [--requests 256] [--input-len 512]
"""

from __future__ import annotations

import time

from dummy_workload import load_workload, workload_parser

from pagedserve import SamplingParams
from pagedserve.executor import sampler


def main() -> None:
    ap = workload_parser(requests=256, input_len=512)
    ap.add_argument("--kernel-only", action="store_true", help="only the fused kernel against torch's passes")
    args = ap.parse_args()
    if args.kernel_only:
        kernel_timing()
        return
    llm, prompts = load_workload(args)

    def run(name: str, k: int | None) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        llm.engine.scheduler.reset_prefix_cache()  # every run computes its prompts
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        if k is not None:
            assert all(len(o.prompt_logprobs) == args.input_len and o.prompt_logprobs[-1] is not None for o in outs)
        print(f"{name}: {args.requests} x {args.input_len} prompt tokens in {dt:.2f} s, "
              f"{tokens / dt:,.0f} prompt tok/s", flush=True)
        return dt

    kernel_timing()
    run("warm-up", 1)
    base = run("no prompt logprobs", None)
    for name, k in (("prompt_logprobs=0", 0), ("prompt_logprobs=1", 1), ("prompt_logprobs=5", 5)):
        print(f"  {run(name, k) / base - 1:+.1%} time against none", flush=True)
    sampler._FUSED_LOGPROBS = False  # k <= 1 through torch's passes, as before the fused kernel
    for name, k in (("prompt_logprobs=0, torch", 0), ("prompt_logprobs=1, torch", 1)):
        print(f"  {run(name, k) / base - 1:+.1%} time against none", flush=True)
    sampler._FUSED_LOGPROBS = True
    run("no prompt logprobs again", None)


def kernel_timing(rows: int = 256, vocab: int = 152064) -> None:
    """One LM-head slice's statistics, device time alone (10 calls captured in a CUDA graph, median of 7
    replays): torch's passes, then the fused kernel's launch configurations."""
    import torch

    from pagedserve.executor.kernels import logprob_stats as kernel

    logits = torch.randn((rows, vocab), device="cuda") * 3
    tokens = torch.randint(0, vocab, (rows,), device="cuda")
    read_mb = rows * vocab * 4 / 1e6

    def device_us(fn) -> float:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 100)  # us a call
        return sorted(times)[3]

    for k in (0, 1):
        sampler._FUSED_LOGPROBS = False
        us = device_us(lambda k=k: sampler.logprob_stats(logits, tokens, k))
        print(f"logprob_stats [{rows}, {vocab}] fp32, k = {k}, torch: {us:.1f} us", flush=True)
    sampler._FUSED_LOGPROBS = True
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        for target in (512, 1024, 2048, 4096):
            us = device_us(lambda b=block, w=warps, t=target: kernel.logprob_stats(
                logits, tokens, True, block=b, num_warps=w, target_programs=t))
            print(f"logprob_stats [{rows}, {vocab}] fp32, k = 1, fused block {block} warps {warps} programs "
                  f"~{target}: {us:.1f} us ({read_mb / us:.2f} TB/s of one read)", flush=True)


if __name__ == "__main__":
    main()
