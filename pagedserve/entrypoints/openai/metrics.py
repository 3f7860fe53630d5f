"""Prometheus metrics on a private registry per app (several apps in one process don't collide).

Gauges and totals are read from the engine's newest stats snapshot at scrape time (a custom
collector: no bookkeeping on the hot path); latency histograms are observed on the event loop as
outputs arrive (AsyncEngine observers). Names follow vLLM's with the `pagedserve:` prefix, or vLLM's own `vllm:` with
`--vllm-metric-names` (dashboards and alerts built for vLLM then read them unchanged).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagedserve.async_engine import AsyncEngine, RequestStream
from pagedserve.outputs import RequestOutput

PREFIX = "pagedserve:"
VLLM_PREFIX = "vllm:"
disable_created_metrics()  # no `*_created` series (as vLLM): they double the output for nothing
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

# Token counts a request: 1, 2, 5 ... up to past a long context (vLLM's build_1_2_5_buckets).
_TOKEN_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))
_N_BUCKETS = (1, 2, 5, 10, 20)

# (stats key, metric suffix, help)
_GAUGES = (
    ("num_running", "num_requests_running", "Sequences being generated (in the running batch)."),
    ("num_waiting", "num_requests_waiting", "Sequences waiting to be scheduled."),
    ("kv_cache_usage", "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)."),
    ("num_free_blocks", "num_free_kv_blocks", "KV cache blocks not held by any request."),
    ("num_total_blocks", "num_total_kv_blocks", "KV cache blocks in all."),
)
_COUNTERS = (
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "Requests preempted (KV blocks freed, recomputed later)."),
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens admitted."),
    ("generation_tokens_total", "generation_tokens", "Tokens generated."),
    ("kernel_compiles_while_serving", "kernel_compiles_while_serving",
     "Triton kernel variants compiled after start-up (each one stalled a step; the warm-up should leave none)."),
)


class _EngineStatsCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str, prefix: str = PREFIX) -> None:
        self.engine = engine
        self.model_name = model_name
        self.prefix = prefix

    def collect(self):
        stats = self.engine.stats
        labels = ["model_name"]
        for key, suffix, help_text in _GAUGES:
            g = GaugeMetricFamily(self.prefix + suffix, help_text, labels=labels)
            g.add_metric([self.model_name], float(stats.get(key, 0)))
            yield g
        for key, suffix, help_text in _COUNTERS:
            c = CounterMetricFamily(self.prefix + suffix, help_text, labels=labels)
            c.add_metric([self.model_name], float(stats.get(key, 0)))
            yield c
        if "cpu_prefix_cache_hits" in stats:  # KV offloading (--kv-offloading-size)
            c = CounterMetricFamily(self.prefix + "cpu_prefix_cache_hits",
                                    "Prompt tokens found in the CPU tier (evicted prefix blocks copied back).",
                                    labels=labels)
            c.add_metric([self.model_name], float(stats["cpu_prefix_cache_hits"]))
            yield c
        g = GaugeMetricFamily(
            self.prefix + "engine_healthy", "1 while the engine thread runs, 0 once it died.", labels=labels
        )
        g.add_metric([self.model_name], 0.0 if self.engine.is_dead else 1.0)
        yield g
        g = GaugeMetricFamily(self.prefix + "num_requests_in_flight", "HTTP-side requests not yet finished.",
                              labels=labels)
        g.add_metric([self.model_name], float(self.engine.num_in_flight))
        yield g
        if "max_loras" in stats:  # vLLM's: the adapters in use as labels, the time of the snapshot as the value
            g = GaugeMetricFamily(self.prefix + "lora_requests_info", "Running stats on LoRA requests.",
                                  labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            g.add_metric([str(stats["max_loras"]), ",".join(stats["waiting_lora_adapters"]),
                          ",".join(stats["running_lora_adapters"])], time.time())
            yield g
        spec = stats.get("spec_decode")
        if spec is not None:  # vLLM's speculative-decoding counters (--speculative-config)
            for key, help_text in (("num_drafts", "Decode steps that carried draft tokens."),
                                   ("num_draft_tokens", "Draft tokens proposed."),
                                   ("num_accepted_tokens", "Draft tokens accepted.")):
                c = CounterMetricFamily(self.prefix + "spec_decode_" + key, help_text, labels=labels)
                c.add_metric([self.model_name], float(spec[key]))
                yield c
            c = CounterMetricFamily(self.prefix + "spec_decode_num_accepted_tokens_per_pos",
                                    "Draft tokens accepted, by their position among a step's drafts.",
                                    labels=[*labels, "position"])
            for position, count in enumerate(spec["accepted_per_position"]):
                c.add_metric([self.model_name, str(position)], float(count))
            yield c
        if getattr(self.engine.engine_config, "enable_sleep_mode", False):  # vLLM's gauge: 1 on the current state
            g = GaugeMetricFamily(self.prefix + "engine_sleep_state", "Sleep mode: 1 on the engine's state.",
                                  labels=[*labels, "sleep_state"])
            level = self.engine.sleep_level if self.engine.is_sleeping() else 0
            for i, state in enumerate(("awake", "weights_offloaded", "discard_all")):
                g.add_metric([self.model_name, state], float(level == i))
            yield g
        replicas = stats.get("data_parallel")
        if replicas:  # --data-parallel-size: the families above are the sums; these, each replica's own
            g = GaugeMetricFamily(self.prefix + "data_parallel_replicas_up",
                                  "Data-parallel replicas serving (the others down: restarting, or given up on).",
                                  labels=labels)
            g.add_metric([self.model_name], float(stats.get("data_parallel_replicas_up", len(replicas))))
            yield g
            for key, suffix, help_text in (*_GAUGES, *_COUNTERS):
                kind = GaugeMetricFamily if (key, suffix, help_text) in _GAUGES else CounterMetricFamily
                family = kind(self.prefix + "replica_" + suffix, help_text + " One data-parallel replica's.",
                              labels=[*labels, "engine"])
                for i, replica in enumerate(replicas):
                    family.add_metric([self.model_name, str(i)], float(replica.get(key, 0)))
                yield family


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(engine, model_name, prefix))
        labels = ["model_name"]
        r = self.registry

        def histogram(suffix: str, help_text: str, buckets: tuple) -> Any:
            return Histogram(self.prefix + suffix, help_text, labels, buckets=buckets, registry=r).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive engine outputs of a request.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to the first scheduling step.",
                               _LATENCY_BUCKETS)
        self.prefill = histogram(
            "request_prefill_time_seconds",
            "Time from the first scheduling step to the first token (the prompt's prefill, chunks included).",
            _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to the last.",
                                _LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds",
                                   "Time from the first scheduling step to the last token.", _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "A request's mean time per output token after its first (decode time / (tokens - 1)).",
                              _ITL_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens a finished request.", _TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Tokens a finished request generated (all its choices).", _TOKEN_BUCKETS)
        self.params_n = histogram("request_params_n", "Choices (n) a finished request asked for.", _N_BUCKETS)
        self._success = Counter(
            self.prefix + "request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._model_name = model_name
        engine.observers.append(self.observe)
        if hasattr(engine, "abort_observers"):
            engine.abort_observers.append(self.observe_abort)

    def observe_abort(self, stream: RequestStream) -> None:
        """A request aborted before it finished (its client went away, or it was cancelled): vLLM counts it in
        request_success_total with finished_reason "abort"."""
        self._success.labels(self._model_name, "abort").inc()

    def observe(self, stream: RequestStream, output: RequestOutput) -> None:
        """Called on the event loop for every engine output of every request (before coalescing)."""
        m = output.metrics
        if m is None:
            return
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        if num_tokens > stream.num_tokens_seen:
            now = m.last_token_time
            if stream.last_token_time is None:
                if m.first_token_time is not None:
                    self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            elif now is not None:
                self.itl.observe(max(0.0, now - stream.last_token_time))
            stream.num_tokens_seen = num_tokens
            stream.last_token_time = now
        if output.finished:
            end = m.finished_time or m.last_token_time
            if end is not None:
                self.e2e.observe(max(0.0, end - m.arrival_time))
            if m.first_scheduled_time is not None:
                self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
                if end is not None:
                    self.inference.observe(max(0.0, end - m.first_scheduled_time))
                if m.first_token_time is not None:
                    self.prefill.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
            if m.first_token_time is not None and end is not None:
                self.decode.observe(max(0.0, end - m.first_token_time))
                if num_tokens > len(output.outputs):  # a choice with more than its first token
                    self.tpot.observe(max(0.0, end - m.first_token_time) / (num_tokens / len(output.outputs) - 1))
            self.prompt_tokens.observe(len(output.prompt_token_ids))
            self.generation_tokens.observe(num_tokens)
            self.params_n.observe(len(output.outputs))
            for o in output.outputs:
                self._success.labels(self._model_name, o.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
