"""Where the device idles between engine steps, and what an admission step spends its time on.

Runs a bench-throughput-like workload through engine.step() with each step and its phases named for
the torch profiler (schedule / launch / wait / process), then reads the profiler's trace:
  * admission steps (the first steps, prompts in them): per step, tokens, decodes, the device time of
    the kernels it launched, and its costliest kernels;
  * a window of decode steps (once the running batch is at most --decode-at): the device's busy time
    against the window's span, every idle gap with the kernels around it and the host call that ended
    it (what the host was doing meanwhile), and the slow host-side CUDA calls.

Usage (GPU machine, repo root):
    python scripts/step_timeline.py --model .devcache/qwen2-7b --output-len 512 --decode-at 256
The script runs on CPU too (tiny model, no device events): a smoke test of its bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pagedserve import LLM, SamplingParams
from pagedserve.bench.datasets import parse_range, random_requests
from pagedserve.executor import model_runner


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _named(obj, attr: str, label: str) -> None:
    """Wraps obj.attr so each call shows in the trace as a range named `label`."""
    fn = getattr(obj, attr)

    def wrapped(*a, **kw):  # (on a class: a plain function, so it binds as a method)
        with record_function(label):
            return fn(*a, **kw)

    setattr(obj, attr, wrapped)


def _trace(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def _gpu_events(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def _enclosing(annotations: list[dict], ts: float) -> str:
    """The innermost user range around a host timestamp, with its parents: 'step3/launch'."""
    names = [a["name"] for a in annotations if a["ts"] <= ts <= a["ts"] + a["dur"]]
    return "/".join(names) if names else "-"


def _launches_by_correlation(events: list[dict]) -> dict[int, dict]:
    out = {}
    for e in events:
        # Runtime calls (cudaLaunchKernel, cudaGraphLaunch) and driver calls (Triton and cuBLAS launch
        # through cuLaunchKernel / cuLaunchKernelEx).
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            c = e.get("args", {}).get("correlation")
            if c is not None:
                out[c] = e
    return out


def _annotations(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"),
                  key=lambda e: (e["ts"], -e["dur"]))


def report_admission(events: list[dict], step_info: dict[str, tuple[int, int, int]]) -> None:
    gpu = _gpu_events(events)
    launches = _launches_by_correlation(events)
    steps = [a for a in _annotations(events) if a["name"] in step_info]
    per_step: dict[str, list[dict]] = defaultdict(list)
    for k in gpu:
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is None:
            continue
        for s in steps:
            if s["ts"] <= launch["ts"] <= s["ts"] + s["dur"]:
                per_step[s["name"]].append(k)
                break
    print("admission steps: tokens, decodes, seqs; device ms of the kernels launched in the step (span ms); "
          "costliest kernels")
    device_ms = {}
    for name, (tokens, decodes, seqs) in step_info.items():
        ks = per_step.get(name, [])
        if not ks:
            print(f"  {name}: {tokens} tokens, {decodes} decodes, {seqs} seqs: no device events")
            continue
        busy = sum(k["dur"] for k in ks) / 1e3
        span = (max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)) / 1e3
        device_ms[name] = busy
        by_name: dict[str, float] = defaultdict(float)
        for k in ks:
            by_name[k["name"][:48]] += k["dur"] / 1e3
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
        print(f"  {name}: {tokens} tokens, {decodes} decodes, {seqs} seqs: {busy:.1f} ms ({span:.1f}); "
              + "; ".join(f"{n} {t:.1f}" for n, t in top))
    # Host calls that block (a sync inside a step's launch stalls the host until the step before ends).
    annotations = _annotations(events)
    blocking = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and e["dur"] >= 1000]
    print(f"  host CUDA calls >= 1 ms during admission: {len(blocking)}")
    for e in blocking[:30]:
        print(f"    {e['name']} {e['dur'] / 1e3:.1f} ms ({_enclosing(annotations, e['ts'])})")
    if len(device_ms) >= 3:
        med = statistics.median(device_ms.values())
        slow = [n for n, t in device_ms.items() if t > 1.5 * med]
        for name in slow:  # every kernel name, this step against the median step
            ks = per_step[name]
            ref_name = min(device_ms, key=lambda n: abs(device_ms[n] - med))
            mine: dict[str, list[float]] = defaultdict(list)
            ref: dict[str, list[float]] = defaultdict(list)
            for k in ks:
                mine[k["name"][:60]].append(k["dur"] / 1e3)
            for k in per_step[ref_name]:
                ref[k["name"][:60]].append(k["dur"] / 1e3)
            print(f"  slow step {name} ({device_ms[name]:.1f} ms) against {ref_name} ({device_ms[ref_name]:.1f} ms): "
                  "kernel: count, total ms, max ms | reference count, total ms")
            for n in sorted(mine, key=lambda n: -sum(mine[n]))[:12]:
                r = ref.get(n, [])
                print(f"    {n}: {len(mine[n])}, {sum(mine[n]):.2f}, {max(mine[n]):.3f} | {len(r)}, {sum(r):.2f}")


def report_decode_window(events: list[dict], min_gap_us: float) -> None:
    gpu = _gpu_events(events)
    if not gpu:
        print("decode window: no device events (CPU run)")
        return
    launches = _launches_by_correlation(events)
    annotations = _annotations(events)
    # The window starts at step1's first kernel: before step0 the device was drained (a sync before
    # the profiler), so step0's launch runs on an idle device.
    first = [a for a in annotations if a["name"] == "step1"]
    if first:
        t1 = first[0]["ts"]
        later = [e for e in gpu if (launches.get(e.get("args", {}).get("correlation")) or {"ts": 0})["ts"] >= t1]
        gpu = later or gpu
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, cursor, gaps = 0.0, start, []
    prev = None
    for e in gpu:
        s, t = e["ts"], e["ts"] + e["dur"]
        if s > cursor:
            if s - cursor >= min_gap_us and prev is not None:
                gaps.append((cursor, s - cursor, prev, e))
            busy += t - s if t > s else 0
        else:
            busy += max(0.0, t - cursor)
        if t > cursor:
            cursor, prev = t, e
    span = end - start
    print(f"decode window: span {span / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms ({100 * busy / span:.1f}%), "
          f"{len(gaps)} gaps >= {min_gap_us:.0f} us totalling {sum(g[1] for g in gaps) / 1e3:.2f} ms")
    for cursor, length, before, after in gaps:
        launch = launches.get(after.get("args", {}).get("correlation"))
        if launch is not None:
            how = (f"launched by {launch['name']} at {(launch['ts'] - cursor) / 1e3:+.3f} ms "
                   f"(host: {_enclosing(annotations, launch['ts'])})")
        else:
            how = "launch not found"
        print(f"  +{(cursor - start) / 1e3:7.3f} ms: idle {length:7.1f} us after {before['name'][:40]!r}, "
              f"before {after['name'][:40]!r}; {how}; host at gap start: {_enclosing(annotations, cursor)}")
    # Where the device time of the window goes, by kernel name (per step: the window's steps counted
    # by their step annotations).
    steps = max(1, sum(1 for a in annotations if a["name"].startswith("step")) - 1)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in gpu:
        by_name[e["name"][:70]].append(e["dur"])
    print(f"device time by kernel over ~{steps} steps (us per step, calls per step, mean us per call):")
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:24]:
        print(f"  {sum(durs) / steps:9.1f} us  x{len(durs) / steps:6.1f}  {statistics.mean(durs):8.2f}  {name}")
    slow = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
            and e["dur"] >= 50]
    print(f"host CUDA calls >= 50 us in the window: {len(slow)}")
    for e in slow[:40]:
        where = _enclosing(annotations, e["ts"])
        print(f"  +{(e['ts'] - start) / 1e3:7.3f} ms {e['name']} {e['dur']:.0f} us ({where})")
    phases: dict[str, list[float]] = defaultdict(list)
    for a in annotations:
        if not a["name"].startswith("step"):
            phases[a["name"]].append(a["dur"] / 1e3)
    print("host phases (ms each, mean): " + ", ".join(f"{n} {statistics.mean(v):.2f} x{len(v)}"
                                                    for n, v in sorted(phases.items())))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100-1024")
    p.add_argument("--output-len", default="512")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--decode-at", type=int, default=256, help="profile decode steps once at most this many run")
    p.add_argument("--decode-steps", type=int, default=6)
    p.add_argument("--min-gap-us", type=float, default=8.0)
    p.add_argument("--max-model-len", type=int, default=None)
    args = p.parse_args()
    kwargs = {"load_format": args.load_format}
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **kwargs)
    engine = llm.engine
    warm = random_requests(min(32, args.num_prompts), parse_range(args.input_len), (8, 8), engine.vocab_size, seed=1)
    llm.generate([r.prompt_token_ids for r in warm], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    requests = random_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                               engine.vocab_size, seed=0)
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt_token_ids,
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=args.temperature,
                                          top_p=1.0), final_only=True)
    last_scheduled: list = [None]
    schedule = engine.scheduler.schedule

    def named_schedule():
        with record_function("schedule"):
            out = schedule()
        last_scheduled[0] = out
        return out

    engine.scheduler.schedule = named_schedule
    _named(engine, "_process", "process")
    _named(type(engine.worker), "execute_async", "launch")  # the class: Worker has __slots__
    result = model_runner.StepHandle.result

    def named_result(self):
        with record_function("wait"):
            return result(self)

    model_runner.StepHandle.result = named_result

    # Admission: the steps that carry prompt tokens (the profile covers them all).
    step_info: dict[str, tuple[int, int, int]] = {}
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(200):
            waiting = engine.scheduler.num_waiting
            prefilling = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
            if not waiting and not prefilling:
                break
            name = f"step{i}"
            with record_function(name):
                engine.step()
            out = last_scheduled[0]  # what this step launched (async: it finished the step before)
            if out is not None and not out.is_empty:
                decodes = sum(1 for r in out.scheduled if len(r.token_ids) == 1)
                step_info[name] = (out.num_batched_tokens, decodes, len(out.scheduled))
        _sync()
    print(f"admission: {len(step_info)} steps, {time.perf_counter() - t0:.2f} s with the profiler")
    try:
        report_admission(_trace(prof), step_info)
    except Exception as e:  # the decode window's report still runs
        print(f"admission report failed: {e!r}")
    # Decode: steps until the batch is small enough, then a profiled window.
    for _ in range(20000):
        if len(engine.scheduler.running) <= args.decode_at or not engine.has_unfinished_requests():
            break
        engine.step()
    for _ in range(5):
        engine.step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.decode_steps):
            with record_function(f"step{i}"):
                engine.step()
    _sync()
    print(f"decode window at {len(engine.scheduler.running)} running")
    report_decode_window(_trace(prof), args.min_gap_us)
    os._exit(0)  # the rest of the workload is not needed


if __name__ == "__main__":
    main()
