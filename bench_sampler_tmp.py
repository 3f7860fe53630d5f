"""One-off GPU timing of the sampler (not part of the repo)."""
import time, torch
from pagedserve.core.outputs import ScheduledRequest
from pagedserve.executor.sampler import Sampler
from pagedserve.sampling_params import SamplingParams

def req(p, out):
    return ScheduledRequest("r", [0], 0, [0], True, p, list(range(500)), out)

V = 151936
s = Sampler(V, {151645})
dev = "cuda"
for S in (1, 32, 256):
    logits = torch.randn(S, V, device=dev) * 4
    out = list(range(100))
    cases = {
        "greedy": [req(SamplingParams(temperature=0), out)] * S,
        "random_unseeded": [req(SamplingParams(temperature=0.8), out)] * S,
        "topp_topk": [req(SamplingParams(temperature=0.8, top_p=0.9, top_k=50), out)] * S,
        "seeded": [req(SamplingParams(temperature=0.8, seed=i), out) for i in range(S)],
        "penalties": [req(SamplingParams(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.3), out)] * S,
        "logprobs5": [req(SamplingParams(temperature=0.8, logprobs=5), out)] * S,
    }
    for name, reqs in cases.items():
        for _ in range(3):
            s(logits, reqs)
        torch.cuda.synchronize()
        t = time.perf_counter(); n = 10
        for _ in range(n):
            s(logits, reqs)
        torch.cuda.synchronize()
        print(f"S={S:4d} {name:16s} {(time.perf_counter()-t)/n*1e3:8.3f} ms")
