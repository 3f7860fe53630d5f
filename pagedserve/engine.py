"""LLMEngine: ties tokenizer, scheduler and model runner together, one `step()` at a time.

    add_request ─► Scheduler.add_request            (tokens in)
    step():  Scheduler.schedule() ─► ModelRunner.execute() ─► Scheduler.update()
             ─► detokenize, find stop strings ─► RequestOutputs      (text out)

Async scheduling (config.async_scheduling; on by default on CUDA): step() schedules and queues step
N, then waits for step N-1's tokens and turns them into outputs while the device runs step N, so the
host's share of a step (scheduling, inputs, sampling set-up, detokenizing) hides behind the device's.
Outputs then trail by one call, and a request that stops on eos or a stop string gets one step
computed past its end (dropped). Requests with repetition/frequency/presence penalties read their
own output history; the sampler keeps it on the device and takes the newest token from the step
before's samples there (executor/sampler.py, PenaltyHistory), so they too run async.
(PAGEDSERVE_PENALTY_SYNC=1 brings back the old rule, for A/B runs: while a penalized request is live,
steps run one at a time.) Requests with structured outputs run async too: a step's token masks need the
step before's tokens, so the engine queues the step's forward first and, while the device runs it, waits
for the step before, feeds its tokens to the grammar matchers and fills the masks the sampling then reads
(the runner's `before_sample` hook; structured_output.py).

The engine knows no HTTP and is not thread-safe: one thread drives it (see async_engine.py).
A request with n > 1 becomes n sibling Requests that share their prompt blocks; its caller sees
one RequestOutput with n CompletionOutputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import SchedulerOutput
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.executor.compile_log import mark_serving, serving_compiles
from pagedserve.lora import LoRARequest
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.spec_decode import NgramProposer, SpecDecodeStats, SpeculativeConfig
from pagedserve.structured_output import SequenceConstraint, StructuredOutputBackend
from pagedserve.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)
# PAGEDSERVE_LOG_STEPS=1: one log line per mixed (prompt-carrying) async step with its host and device times.
_LOG_STEPS = os.environ.get("PAGEDSERVE_LOG_STEPS") == "1"
_PENALTY_SYNC = os.environ.get("PAGEDSERVE_PENALTY_SYNC") == "1"
_OVERLAP_FILL_ROWS = 4  # from this many constrained rows, an async step's masks fill on the mask thread


@dataclass(slots=True)
class _Choice:
    """One of the n completions of a request: its scheduler Request and its text state."""

    request: Request
    detokenizer: IncrementalDetokenizer | None  # None: the caller detokenizes (see LLMEngine.detokenize)
    output: CompletionOutput
    constraint: SequenceConstraint | None = None  # structured outputs: its place in the grammar


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[_Choice]
    metrics: RequestMetrics
    final_only: bool = False  # the caller wants only the finished output: no per-step outputs
    # The prompt tokens found in the prefix cache: the least of the choices' (n > 1 siblings find the blocks the
    # first one computes; those are not a cache hit); -1 until one is admitted.
    num_cached_tokens: int = -1
    num_unfinished: int = 0
    prompt_logprobs: list | None = None  # [None, TokenLogprobs...] when asked (filled by the first choice's steps)
    embedding: list[float] | None = None  # an embedding request's vector (params.pooling), once computed

    @property
    def child_ids(self) -> list[str]:
        return [c.request.request_id for c in self.choices]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What code written for vLLM most often reads from `llm.llm_engine.model_config`."""

    model: str
    tokenizer: str
    served_model_name: str
    max_model_len: int
    dtype: Any  # a torch.dtype
    seed: int
    hf_config: Any  # the model's transformers config

    def get_vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def get_hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)


class LLMEngine:
    def __init__(self, config: EngineConfig,
                 on_tokenizer_source: Callable[[str, str | None], None] | None = None) -> None:
        """`on_tokenizer_source(source, chat_template)`: called early in start-up with what this engine's
        tokenizer loads from (the engine process announces it, so the server loads its own meanwhile)."""
        from pagedserve.executor.worker import build_worker  # torch lives behind this import

        started = time.monotonic()
        self.worker = build_worker(config, on_tokenizer_source=on_tokenizer_source)
        self.config: EngineConfig = self.worker.config  # resolved: model path, dtype, lengths
        self.tokenizer = self.worker.tokenizer
        self.model_name: str = self.config.served_model_name or self.config.model or "model"
        self.max_model_len: int = self.worker.max_model_len
        self.max_num_seqs: int = self.config.max_num_seqs
        self.vocab_size: int = self.worker.vocab_size
        # Sampling fields requests leave unset take these (the model's generation_config.json).
        self.default_sampling: dict = dict(getattr(self.worker, "default_sampling", None) or {})
        runner = getattr(self.worker, "runner", None)
        # enable_lora: the adapter slots (executor/lora.py); None without LoRA.
        self._lora_manager = getattr(runner, "lora_manager", None)
        self.scheduler = Scheduler(
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.worker.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            num_blocks=self.worker.num_kv_blocks,
            block_size=self.config.block_size,
            enable_prefix_caching=self.config.enable_prefix_caching,
            lora_slot_for=None if self._lora_manager is None else self._lora_manager.slot_of,
            # a draft model's proposer comes with the worker (it runs on the device); n-gram lookup here
            proposer=getattr(self.worker, "draft_proposer", None) or (
                None if self.config.speculative_config is None
                else NgramProposer(SpeculativeConfig.parse(self.config.speculative_config))),
            policy=self.config.scheduling_policy,
            long_prefill_token_threshold=self.config.long_prefill_token_threshold,
            sliding_window=getattr(self.worker, "sliding_window", None),
            num_cpu_blocks=getattr(self.worker, "num_cpu_kv_blocks", 0),
            hybrid_window=getattr(self.worker, "hybrid_window", None),
            num_window_groups=getattr(self.worker, "num_window_groups", 0),
        )
        # Requests without max_tokens generate up to the context's end, or what the KV cache holds when it holds less
        # (the scheduler refuses a request that could never fit: every such request was refused).
        self._kv_capacity: int | None = None
        if self.scheduler.sliding_window is None:
            capacity = self.scheduler.request_capacity
            if capacity < self.max_model_len:
                self._kv_capacity = capacity
                logger.warning("the KV cache holds %d tokens, fewer than max_model_len %d: a request without "
                               "max_tokens generates until its prompt and answer fill the cache", capacity,
                               self.max_model_len)
        # A bare decoder or one saved without its LM head (executor/loader.py): embedding requests only.
        self.embedding_only = bool(getattr(getattr(runner, "model", None), "embedding_only", False))
        # A sequence classifier (*ForSequenceClassification): its label names; None for other models.
        self.class_labels: list[str] | None = getattr(getattr(runner, "model", None), "id2label", None)
        self._warming = False
        if self._lora_manager is not None:
            self._lora_manager.live_ids = lambda: {r.lora_request.lora_int_id for r in self.scheduler.requests.values()
                                                   if r.lora_request is not None}
        # Models with several end tokens (e.g. Llama 3): the others stop like stop_token_ids.
        self._extra_eos_ids = sorted(set(self.tokenizer.eos_token_ids) - {self.tokenizer.eos_token_id})
        self._requests: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}
        self.step_timing = StepTiming()
        # KV memory use by step (bench throughput sets it: KVOccupancy); None: not measured
        self.kv_occupancy: KVOccupancy | None = None
        on_cuda = self.worker.device is not None and self.worker.device.type == "cuda"
        self.async_scheduling = (self.config.async_scheduling if self.config.async_scheduling is not None
                                 else on_cuda)
        self._pending = None  # (SchedulerOutput, StepHandle, t_start, t_scheduled, t_launched) in flight
        # True: each RequestOutput holds copies the caller may keep. False: the engine's own growing
        # CompletionOutputs, valid until the next step (for a caller that consumes them at once, as
        # the engine process does when it turns them into deltas; copying every output's token list
        # each step costs O(length) per request).
        self.copy_outputs = True
        self._sync_ids: set[str] = set()  # live penalized requests, with PAGEDSERVE_PENALTY_SYNC=1 only
        self._constraints: dict[str, SequenceConstraint] = {}  # child request id -> its grammar matcher
        self._fill_pool: ThreadPoolExecutor | None = None  # fills async steps' token masks (made on first use)
        self._structured: StructuredOutputBackend | None = None
        if on_cuda:  # a server: the vocabulary table (~1 s) is built in the background now, not on a request
            self.structured_output_backend()
        # False: requests without stop strings get no text here (CompletionOutput.text stays ""); the
        # caller turns token ids into text itself. The engine process runs so and the server side
        # detokenizes (engine_process.DeltaDecoder), taking that work off the step loop. Requests with
        # stop strings are always detokenized here: finding a stop string ends the request.
        self.detokenize = True
        # True (LLM, vLLM's offline behaviour): a max_tokens past the context generates until the context is full
        # (finish_reason "length"); False (the server, as OpenAI's API): such a request is a ValueError (a 400).
        self.clip_max_tokens = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        if on_cuda and not config.skip_warmup:
            self.warm_up()
        if on_cuda:  # from here a Triton compile stalls a step: each is logged as a warning
            mark_serving()
        self.startup_seconds = time.monotonic() - started
        logger.info("engine ready in %.1f s: %d KV blocks of %d tokens (%d tokens%s), max_model_len %d",
                    self.startup_seconds, self.worker.num_kv_blocks, self.config.block_size,
                    self.worker.num_kv_blocks * self.config.block_size,
                    f"; one request up to {self.scheduler.request_capacity}: window groups hold their share"
                    if self.scheduler.kv_cache.num_window_groups else "",
                    self.max_model_len)

    def warm_up(self) -> float:
        """Runs throwaway requests through every kind of step before serving, so that on a GPU the
        Triton kernel variants those steps need compile now instead of stalling the first real
        requests for seconds each: a prefill-only step; mixed steps (a prefill beside many decodes,
        where the decode kernel runs unsplit, and beside few, where it splits); prefills over short
        and 2k+ keys; decode-only steps; greedy and random sampling.
        Leaves the engine as it found it: no requests, every block free, counters at zero."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() runs before any request is added")
        t0 = time.monotonic()
        vocab = min(self.vocab_size, 30000)

        def add(name: str, num_tokens: int, max_tokens: int, temperature: float, extra: dict | None = None) -> None:
            num_tokens = max(1, min(num_tokens, self.max_model_len - max_tokens - 1))
            ids = [(sum(map(ord, name)) + i * 104729) % (vocab - 100) + 100 for i in range(num_tokens)]
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature, **(extra or {}))
            self.add_request(name, ids, params)

        # The sampler's other paths (filters: on CUDA the threshold kernel; penalties, logprobs, logit bias,
        # min tokens: torch ops): their first use on a GPU compiles or loads kernels (~80-110 ms for a first
        # top-p or top-k request on the H200, session 11 run 7).
        filtered = {"top_p": 0.9, "top_k": 20, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.3,
                    "repetition_penalty": 1.1, "logprobs": 5, "seed": 7, "logit_bias": {vocab // 2: 1.0},
                    "min_tokens": 2}

        num_short = min(40, self.config.max_num_seqs - 4)
        # step -> requests that join before it: (name, prompt tokens, max tokens, temperature[, other params])
        script = {
            0: [(f"__warmup_short{i}", 8, 6, 1.0) for i in range(num_short)],
            1: [("__warmup_a", 300, 12, 1.0)],  # beside ~40 decodes
            2: [("__warmup_b", 40, 12, 0.0), ("__warmup_f", 20, 3, 0.7, filtered),
                ("__warmup_g", 20, 3, 0.9, {"top_p": 0.95})],  # all filters at once; top-p alone
            3: [("__warmup_c", 2100, 4, 0.0)] if self.max_model_len > 2200 else [],  # long keys
            # beside a few decodes, once the short ones are done; penalties without a repetition penalty
            9: [("__warmup_d", 50, 2, 0.0), ("__warmup_h", 20, 3, 0.8, {"frequency_penalty": 0.2})],
        }
        names = [req[0] for reqs in script.values() for req in reqs]

        def run_script() -> None:
            self._warming = True  # (an embedding model's kernels compile through generated requests too)
            try:
                step = 0
                while step <= max(script) or self.has_unfinished_requests():
                    for req in script.get(step, []):
                        add(*req)
                    self.step()
                    step += 1
            finally:
                self._warming = False
                self.abort_request(names)
                self._drain()
            self.scheduler.reset_prefix_cache()
            self.scheduler.kv_cache.prefix_cache_queries = self.scheduler.kv_cache.prefix_cache_hits = 0
            self.step_timing.totals.clear()
            self.prompt_tokens_total = self.generation_tokens_total = 0
            # Drafting and preemption counters too: the script's random-sampling requests reject most drafts (a
            # self-draft read 37% kept on the GPU instead of 100%: session 30), and none of it was served.
            self.scheduler.spec_stats = SpecDecodeStats()
            self.scheduler.num_preemptions = 0
            if self.scheduler.kv_cache.cpu is not None:
                self.scheduler.kv_cache.cpu_prefix_cache_hits = 0

        from pagedserve.executor.precompile import compile_ahead

        # On CUDA the script first runs dry (its Triton variants compile side by side; the sampled
        # tokens are garbage, but in range, and the requests are thrown away), then for real.
        with compile_ahead("warm-up") as dry:
            if dry:
                run_script()
            # cuBLAS at every eager token count (model_runner.warm_gemm_shapes): inside the block its host
            # work overlaps the Triton compiles the dry run just queued.
            shapes, seconds = self.worker.runner.warm_gemm_shapes(self.config.max_num_batched_tokens,
                                                                  self.config.max_num_seqs)
            if shapes:
                logger.info("start-up: cuBLAS warmed at %d token counts in %.1f s", shapes, seconds)
            self.worker.runner.warm_prefill_variants()  # every tile config, whichever steps come later
        run_script()
        elapsed = time.monotonic() - t0
        from pagedserve.executor.compile_log import summary_suffix

        logger.info("warm-up (kernel variants compiled) in %.1f s%s", elapsed, summary_suffix())
        return elapsed

    # ------------------------------------------------------------------ requests in
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
        final_only: bool = False,
        compiled_grammar: Any = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Queues a prompt (text or token ids). `prompt_text` labels a token-id prompt in outputs.

        final_only: step() reports the request once, when it finishes (the offline API's mode).
        Without stop strings its text is then decoded once at the end instead of token by token.
        compiled_grammar: `params.structured_outputs` compiled already (`compile_structured_async`);
        without it the constraint is compiled here, on the calling thread.
        lora_request: the LoRA adapter to run it with (enable_lora): read and checked now, loaded into a device slot
        when the scheduler admits the request.
        priority: with scheduling_policy "priority", lower runs first (any other policy takes only 0).
        cache_salt: a prefix-cache namespace (vLLM's): the request shares cached blocks only with requests of the
        same salt (tenants that must not learn of each other's prompts through cache timing).
        """
        params = params or self.default_sampling_params()
        if self.worker.is_sleeping():
            raise ValueError("the engine is asleep (sleep mode); wake_up() before adding requests")
        self._check_priority(priority)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        limit = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            if (value := getattr(params, name)) is not None and value > limit:
                raise ValueError(f"{name} {value} is more than this server's max_logprobs ({limit}; "
                                 "--max-logprobs raises it, up to 20)")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text = prompt
            prompt_token_ids = self.tokenizer.encode(prompt)
        else:
            prompt_token_ids = list(prompt)
        pooling = params.pooling is not None
        if self.embedding_only and not pooling and not self._warming:
            if self.class_labels is not None:
                raise ValueError("this is a sequence classification model: it serves classification and scoring "
                                 "only (POST /classify, /score, /rerank; LLM.classify, LLM.score)")
            raise ValueError("this model has no LM head (an embedding model): it serves embeddings only "
                             "(POST /v1/embeddings, LLM.embed)")
        if pooling and not self._warming:
            classify = params.pooling.task == "classify"
            if classify and self.class_labels is None:
                raise ValueError("classification needs a sequence classification model (*ForSequenceClassification);"
                                 " this one embeds (POST /v1/embeddings, LLM.embed)")
            if not classify and self.class_labels is not None:
                raise ValueError("this is a sequence classification model: it classifies and scores (POST /classify, "
                                 "/score, /rerank; LLM.classify, LLM.score), it does not embed")
        if params.truncate_prompt_tokens is not None:  # vLLM's: keep the last N (-1: max_model_len) tokens
            keep = self.max_model_len if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
            prompt_token_ids = prompt_token_ids[-keep:]
        self._check_prompt(prompt_token_ids, whole_context=pooling)
        if params.bad_words and params.bad_words_token_ids is None:
            params = dataclasses.replace(params, bad_words_token_ids=self._bad_words_ids(params.bad_words))
        params.validate_for_model(self.vocab_size)
        if pooling:
            params.pooling.validate_for_model(int(self.worker.hf_config.hidden_size))
        # An embedding request's one token is sampled past its prompt and dropped: its prompt may fill the context.
        max_tokens = 1 if pooling else self._resolve_max_tokens(len(prompt_token_ids), params)
        compiled = None
        if params.structured_outputs is not None:
            compiled = compiled_grammar
            if compiled is None:
                compiled = self.structured_output_backend().compile(params.structured_outputs)
        lora_request, lora_salt = self._lora_checked(lora_request)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        state = _RequestState(request_id, prompt_text, prompt_token_ids, params, [], RequestMetrics(arrival),
                              final_only=final_only)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(prompt_token_ids)
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                if seed is not None and seed > 2**64 - 1:  # (wrapped into the 64-bit range SamplingParams takes)
                    seed -= 2**64
                # The first choice computes the prompt logprobs; the others may share its prompt blocks.
                prompt_logprobs = params.prompt_logprobs if index == 0 else None
                child_params = dataclasses.replace(params, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
            if self._extra_eos_ids and not params.ignore_eos:
                extra = [t for t in self._extra_eos_ids if t not in child_params.stop_token_ids]
                if extra:
                    stops = [*child_params.stop_token_ids, *extra]
                    child_params = dataclasses.replace(child_params, stop_token_ids=stops)
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(
                request_id=child_id,
                prompt_token_ids=prompt_token_ids,
                sampling_params=child_params,
                max_tokens=max_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                group_id=request_id if params.n > 1 else None,
                # Siblings always share prompt blocks; other requests only when prefix caching is on.
                cache_salt=_salted(None if self.config.enable_prefix_caching or params.n == 1 else request_id,
                                   None if cache_salt is None else f"salt:{cache_salt}", lora_salt),
                arrival_time=arrival,
                lora_request=lora_request,
                priority=priority,
            )
            detok = None
            if params.pooling is None and ((self.detokenize and params.detokenize) or needs_engine_text(params)):
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            output = CompletionOutput(index=index, text="", token_ids=[],
                                      cumulative_logprob=None if params.logprobs is None else 0.0,
                                      logprobs=None if params.logprobs is None else [])
            constraint = None if compiled is None else self._structured.matcher(compiled)
            state.choices.append(_Choice(request, detok, output, constraint))
        for choice in state.choices:  # every child id free first (one taken by another request: nothing added)
            child_id = choice.request.request_id
            if child_id in self.scheduler.requests or child_id in self._child_to_parent:
                raise ValueError(f"a request with id {child_id!r} is already running or waiting")
        for choice in state.choices:  # add only once every child is built, so errors leave no trace
            self.scheduler.add_request(choice.request)
            self._child_to_parent[choice.request.request_id] = (request_id, choice.output.index)
            if params.needs_penalties and _PENALTY_SYNC:
                self._sync_ids.add(choice.request.request_id)
            if any(len(seq) > 1 for seq in params.bad_words_token_ids or ()):
                # a bad word's last token is banned after its other tokens: each step needs the one before's
                self._sync_ids.add(choice.request.request_id)
            if choice.constraint is not None:
                self._constraints[choice.request.request_id] = choice.constraint
        state.num_unfinished = params.n
        self._requests[request_id] = state
        self.prompt_tokens_total += len(prompt_token_ids) * params.n

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words: each word as it starts a text and after a space (the two spellings of
        most BPE vocabularies), once each."""
        ids: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                seq = self.tokenizer.encode(text, add_special_tokens=False)
                if seq and seq not in ids:
                    ids.append(seq)
        return ids

    def _check_priority(self, priority: object) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy (--scheduling-policy "
                             f"priority); this engine schedules {self.config.scheduling_policy}")

    def _lora_checked(self, lora_request: LoRARequest | None) -> tuple[LoRARequest | None, str | None]:
        """Checks a request's adapter; returns it (a Hub repo id's replaced by its downloaded folder, so no rank
        downloads again) and its prefix-cache namespace (None without one): an adapter's cached blocks are its own,
        since the same prompt under another adapter (or none) has other K/V."""
        if lora_request is None:
            return None, None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self._lora_manager is None:
            raise ValueError("this engine was started without LoRA support; start it with enable_lora=True "
                             "(--enable-lora)")
        from pagedserve.lora import resolve_adapter_path

        path = resolve_adapter_path(lora_request.lora_path, self.config.hf_token, self.config.download_dir)
        if path != lora_request.lora_path:
            lora_request = dataclasses.replace(lora_request, lora_path=path)
        self._lora_manager.register(lora_request)  # read and checked now; its slot comes when the scheduler admits it
        return lora_request, f"lora:{lora_request.lora_int_id}"

    def compile_structured_async(self, spec: StructuredOutputsParams) -> Future:
        """Compiles a structured-output constraint on a worker thread, for add_request's `compiled_grammar`
        (the server's engine loop: a slow grammar then does not stall the running streams)."""
        return self.structured_output_backend().compile_async(spec)

    def structured_output_backend(self) -> StructuredOutputBackend:
        """The grammar compiler for this model's vocabulary (made on first use; on CUDA at start-up)."""
        if self._structured is None:
            self._structured = StructuredOutputBackend(self.tokenizer.hf, self.vocab_size,
                                                       sorted(self.tokenizer.eos_token_ids))
        return self._structured

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (vLLM's LLMEngine.get_tokenizer); the engine's wrapper: `.tokenizer`."""
        return self.tokenizer.hf

    @property
    def model_config(self) -> ModelConfig:
        """vLLM's llm_engine.model_config, its common fields."""
        return ModelConfig(model=self.config.model or "", tokenizer=self.config.tokenizer or self.config.model or "",
                           served_model_name=self.model_name, max_model_len=self.max_model_len,
                           dtype=getattr(self.worker, "dtype", None), seed=self.config.seed,
                           hf_config=getattr(self.worker, "hf_config", None))

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config defaults (vLLM's get_default_sampling_params)."""
        return SamplingParams(**self.default_sampling)

    def _check_prompt(self, token_ids: list[int], whole_context: bool = False) -> None:
        """whole_context: the prompt may take all of max_model_len (an embedding request); else it must leave room
        for a token."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        # C-level passes (type, min, max): long prompts arrive in bursts, and a Python loop per token
        # id was a visible share of admitting 500 prompts of 2,000 tokens.
        if set(map(type, token_ids)) != {int} or min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            for t in token_ids:
                if type(t) is not int or not 0 <= t < self.vocab_size:  # bools and other types too
                    raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len + whole_context:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model's context length is {self.max_model_len} "
                f"tokens{'' if whole_context else ', leaving no room to generate'}; shorten the prompt"
            )

    def _resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        room = self.max_model_len - num_prompt_tokens
        if params.max_tokens is None:
            if self._kv_capacity is not None:  # (the K/V of all but the last token are cached)
                return max(1, min(room, self._kv_capacity + 1 - num_prompt_tokens))
            return room
        if params.max_tokens > room:
            if self.clip_max_tokens:  # (and within what the KV cache holds, as for max_tokens None)
                if self._kv_capacity is not None:
                    return max(1, min(room, self._kv_capacity + 1 - num_prompt_tokens))
                return room
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{num_prompt_tokens} prompt tokens plus max_tokens {params.max_tokens} make "
                f"{num_prompt_tokens + params.max_tokens}; reduce the prompt or max_tokens"
            )
        return params.max_tokens

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self._requests.pop(rid, None)
            if state is None:
                continue
            self.scheduler.finish_requests(state.child_ids, RequestStatus.FINISHED_ABORTED)
            for child_id in state.child_ids:
                self._child_to_parent.pop(child_id, None)
                self._sync_ids.discard(child_id)
                self._constraints.pop(child_id, None)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests it advanced (with async scheduling:
        of the step before, whose tokens it waited for while this one runs on the device)."""
        if self.async_scheduling and not self._sync_ids:
            return self._step_async()
        outputs = self._drain()
        t_start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        if self.kv_occupancy is not None:
            self.kv_occupancy.add(self.scheduler)
        if scheduler_output.is_empty:
            self._report_finished(scheduler_output)
            return outputs
        if self._constraints:
            self._attach_token_masks(scheduler_output)()
        t_scheduled = time.perf_counter()
        runner_output = self.worker.execute(scheduler_output)
        t_executed = time.perf_counter()
        outputs += self._process(scheduler_output, runner_output)
        self.step_timing.add(scheduler_output, t_scheduled - t_start, t_executed - t_scheduled,
                             time.perf_counter() - t_executed)
        return outputs

    def _attach_token_masks(self, scheduler_output: SchedulerOutput, background: bool = False
                            ) -> Callable[[], None]:
        """Fills the token masks of the step's constrained rows that sample, from matchers that have taken every
        earlier token; returns the call that attaches them to the rows. `background`: with enough rows the fill
        runs on the mask thread (xgrammar leaves the GIL) until that call. A grammar already complete gets no
        mask (its request ends as the step before is processed; its row's token is dropped)."""
        rows, constraints = [], []
        for r in scheduler_output.scheduled:
            constraint = self._constraints.get(r.request_id) if r.needs_sample else None
            if constraint is not None and not constraint.is_done:
                rows.append(r)
                constraints.append(constraint)
        if not rows:
            return lambda: None
        if background and len(rows) >= _OVERLAP_FILL_ROWS:
            if self._fill_pool is None:
                self._fill_pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-masks")
            masks = self._fill_pool.submit(self._structured.fill_bitmask, constraints)
        else:  # a few rows: filling them here costs less than a thread hop
            masks = Future()
            masks.set_result(self._structured.fill_bitmask(constraints))

        def attach() -> None:
            for r, mask in zip(rows, masks.result(), strict=True):
                r.allowed_token_bitmask = mask

        return attach

    def _step_async(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        if self.kv_occupancy is not None:
            self.kv_occupancy.add(self.scheduler)
        t_scheduled = time.perf_counter()
        pending = self._pending
        self._pending = None
        outputs: list[RequestOutput] | None = None
        if not scheduler_output.is_empty:
            before_sample = None
            if self._constraints:
                # Structured outputs: the masks need the step before's tokens. The forward is queued by now;
                # finish the step before while the device runs it, then fill the masks the sampler reads.
                def before_sample() -> None:
                    nonlocal outputs, pending
                    if pending is not None:  # its tokens reach the matchers first; the masks fill meanwhile
                        outputs, pending = self._finish(pending, masks_for=scheduler_output), None
                    else:
                        self._attach_token_masks(scheduler_output)()

            handle = self.worker.execute_async(scheduler_output, before_sample)
            self._pending = (scheduler_output, handle, t_start, t_scheduled, time.perf_counter())
        else:
            self._report_finished(scheduler_output)
        if pending is not None:  # not finished in before_sample (no constraints, or a step that samples nothing)
            outputs = self._finish(pending)
        return outputs or []

    def _report_finished(self, scheduler_output: SchedulerOutput) -> None:
        """An empty schedule still tells the runner which requests ended (it frees their sampler state)."""
        if scheduler_output.finished_request_ids:
            self.worker.execute_async(scheduler_output)  # queues nothing: no request is scheduled

    def _drain(self) -> list[RequestOutput]:
        """Finishes the step in flight, if any (async scheduling)."""
        pending, self._pending = self._pending, None
        return self._finish(pending) if pending is not None else []

    def _finish(self, pending: tuple, masks_for: SchedulerOutput | None = None) -> list[RequestOutput]:
        """Waits for the step in flight and processes it. masks_for: the next step, whose token masks are
        filled (after this step's tokens reached the matchers) while the rest of this step is processed."""
        scheduler_output, handle, t_start, t_scheduled, t_launched = pending
        t_wait = time.perf_counter()
        runner_output = handle.result()
        t_done = time.perf_counter()
        outputs = self._process(scheduler_output, runner_output, masks_for)
        # Its execute time: the launch (host) plus the wait for the device.
        device_s = getattr(handle, "device_seconds", None)
        self.step_timing.add(scheduler_output, t_scheduled - t_start, (t_launched - t_scheduled) + (t_done - t_wait),
                             time.perf_counter() - t_done, device_s, launch_s=t_launched - t_scheduled)
        if _LOG_STEPS and scheduler_output.num_batched_tokens > len(scheduler_output.scheduled):
            from pagedserve.executor.compile_log import summary_suffix  # (with PAGEDSERVE_LOG_COMPILES=1)

            logger.info("mixed step: %d tokens, %d seqs: schedule %.1f, launch %.1f, wait %.1f, device %s ms%s",
                        scheduler_output.num_batched_tokens, len(scheduler_output.scheduled),
                        1e3 * (t_scheduled - t_start), 1e3 * (t_launched - t_scheduled), 1e3 * (t_done - t_wait),
                        f"{1e3 * device_s:.1f}" if device_s is not None else "-", summary_suffix())
        return outputs

    def _process(self, scheduler_output: SchedulerOutput, runner_output,
                 masks_for: SchedulerOutput | None = None) -> list[RequestOutput]:
        if runner_output.prompt_logprobs:
            self._store_prompt_logprobs(scheduler_output, runner_output.prompt_logprobs)
        updates = self.scheduler.update(scheduler_output, runner_output)
        # The new tokens go into the matchers first; then the next step's masks can fill on the mask thread
        # while the updates below are applied (detokenizing, outputs).
        grammar_ended = self._accept_constrained(updates) if self._constraints else {}
        attach_masks = None if masks_for is None else self._attach_token_masks(masks_for, background=True)
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        for update in updates:
            parent = self._child_to_parent.get(update.request.request_id)
            if parent is None:
                continue
            state = self._requests[parent[0]]
            self._apply_update(state, state.choices[parent[1]], update, now, grammar_ended)
            touched[state.request_id] = state
        if attach_masks is not None:
            attach_masks()
        return [self._make_output(state) for state in touched.values()
                if not state.final_only or state.num_unfinished == 0]

    def _accept_constrained(self, updates: list) -> dict[str, bool]:
        """Each constrained request's new tokens into its matcher: request id -> whether its grammar ended it
        (complete, or a token it does not allow: only possible when min_tokens masked the stop token it asked
        for); _apply_update finishes those."""
        ended: dict[str, bool] = {}
        for update in updates:
            constraint = self._constraints.get(update.request.request_id)
            if constraint is not None and not update.finished and update.new_token_ids:
                ended[update.request.request_id] = not constraint.accept(update.new_token_ids) or constraint.is_done
        return ended

    def _store_prompt_logprobs(self, scheduler_output: SchedulerOutput, prompt_logprobs: list) -> None:
        for scheduled, part in zip(scheduler_output.scheduled, prompt_logprobs, strict=True):
            request = self.scheduler.requests.get(scheduled.request_id)
            if request is None or (scheduled.serial >= 0 and request.serial != scheduled.serial):
                continue  # (its request was aborted since; a new one may have its id)
            parent = None if part is None else self._child_to_parent.get(scheduled.request_id)
            state = None if parent is None else self._requests.get(parent[0])
            if state is not None and state.prompt_logprobs is not None:
                first, entries = part
                state.prompt_logprobs[first:first + len(entries)] = entries

    def _apply_update(self, state: _RequestState, choice: _Choice, update, now: float,
                      grammar_ended: dict[str, bool]) -> None:
        request, out, detok = choice.request, choice.output, choice.detokenizer
        if request.num_cached_tokens >= 0 and (state.num_cached_tokens < 0
                                               or request.num_cached_tokens < state.num_cached_tokens):
            state.num_cached_tokens = request.num_cached_tokens
        # The scheduler stamps each request when it first admits it; the group's is the earliest.
        scheduled_at = request.first_scheduled_time
        if scheduled_at is not None and (state.metrics.first_scheduled_time is None
                                         or scheduled_at < state.metrics.first_scheduled_time):
            state.metrics.first_scheduled_time = scheduled_at
        if request.sampling_params.pooling is not None:
            self._apply_pooled(state, choice, update, now)
            return
        new_ids, new_logprobs = update.new_token_ids, update.new_logprobs
        engine_text = detok is not None and not (state.final_only and not needs_engine_text(request.sampling_params))
        fed = 0  # of new_ids, the tokens the detokenizer has taken
        if engine_text and detok.stop and len(new_ids) > 1:
            # Several tokens at once (speculative decoding): the output ends at the token that completes a stop
            # string, as it would have with one token a step; the tokens after it are dropped.
            for token_id in new_ids[:-1]:
                detok.add_tokens([token_id])
                fed += 1
                if detok.stop_reason is not None:
                    new_ids, new_logprobs = new_ids[:fed], new_logprobs[:fed]
                    break
        drop_stop = False  # the stop token that ended the request stays out of its text (stop_token_ends_text)
        if new_ids:
            self.generation_tokens_total += len(new_ids)
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
            out.token_ids.extend(new_ids)
            drop_stop = update.finished and stop_token_ends_text(request.sampling_params, out.token_ids,
                                                                 request.status.finish_reason,
                                                                 self.tokenizer.eos_token_ids)
            text_ids = (new_ids[:-1] if drop_stop else new_ids)[fed:]
            if out.logprobs is not None:
                for lp in new_logprobs:
                    if lp is not None:
                        out.logprobs.append(lp)
                        out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.logprob
            if engine_text and text_ids:
                detok.add_tokens(text_ids)
        finished = update.finished
        if not finished and grammar_ended.get(request.request_id):  # structured outputs: _accept_constrained
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            finished = True
        if not finished and detok is not None and detok.stop_reason is not None:
            # A stop string ended it: the scheduler learns now and frees its blocks.
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            finished = True
        if finished and out.finish_reason is None:
            if detok is not None:
                if state.final_only and not needs_engine_text(request.sampling_params):
                    detok.add_tokens(out.token_ids[:-1] if drop_stop else out.token_ids)  # one decode of it all
                detok.flush()
            if detok is not None and detok.stop_reason is not None:
                out.finish_reason, out.stop_reason = "stop", detok.stop_reason
            else:
                out.finish_reason = request.status.finish_reason or "stop"
                out.stop_reason = request.stop_reason
            state.num_unfinished -= 1
            self._child_to_parent.pop(request.request_id, None)
            self._sync_ids.discard(request.request_id)
            self._constraints.pop(request.request_id, None)
        # What callers may be shown: the detokenizer holds back a tail that could start a stop string.
        if detok is not None:
            out.text = detok.text

    def _apply_pooled(self, state: _RequestState, choice: _Choice, update, now: float) -> None:
        """An embedding request's one update: its vector, computed at its last prompt token. The token sampled
        there ends it (max_tokens 1) and is dropped: the output holds no tokens."""
        if update.embedding is not None:
            state.embedding = update.embedding
            state.metrics.first_token_time = state.metrics.last_token_time = now
        if update.finished and choice.output.finish_reason is None:
            choice.output.finish_reason = "stop"
            state.num_unfinished -= 1
            self._child_to_parent.pop(choice.request.request_id, None)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        finished = state.num_unfinished == 0
        if finished:
            state.metrics.finished_time = time.monotonic()
            self._requests.pop(state.request_id, None)
        m = state.metrics
        if self.copy_outputs:
            outputs = [_snapshot(c.output) for c in state.choices]
            m = RequestMetrics(m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                               m.finished_time)
        else:  # the caller reads them before the next step (see copy_outputs)
            outputs = [c.output for c in state.choices]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=max(state.num_cached_tokens, 0),
            metrics=m,
            prompt_logprobs=state.prompt_logprobs,
            embedding=state.embedding,
        )

    # ------------------------------------------------------------------ state
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def load_weights(self, weights: Any) -> int:
        """New weights between generations (Worker.load_weights: a safetensors folder, a dict or (name, tensor)
        pairs, by checkpoint names), then the prefix cache forgotten (its blocks hold the old weights' keys and
        values). ValueError while requests are unfinished. Returns how many tensors were applied."""
        if self.has_unfinished_requests():
            raise ValueError("load_weights: requests are unfinished; update weights between generations")
        try:
            return self.worker.load_weights(weights)
        finally:
            self.reset_prefix_cache()  # also after a partial update that raised

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None) -> None:
        """Joins a trainer's process group for update_weights_from_distributed (executor/weight_sync.py)."""
        if self.config.data_parallel_size > 1:
            raise ValueError("init_weights_update_group: not with data parallelism yet (each replica would need a "
                             "rank of its own)")
        self.worker.init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                              backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group") -> int:
        """New weights broadcast by the trainer, between generations; the prefix cache forgotten after."""
        if self.has_unfinished_requests():
            raise ValueError("update_weights_from_distributed: requests are unfinished; update between generations")
        try:
            return self.worker.update_weights_from_distributed(names, dtypes, shapes, group_name)
        finally:
            self.reset_prefix_cache()

    def sleep(self, level: int = 1) -> int:
        """Sleep mode (vLLM's): gives the device memory of the weights and the KV cache back between generations
        (level 1: weights kept in host memory; level 2: discarded, load new ones after wake_up). The prefix cache is
        forgotten. ValueError while requests are unfinished; requests are refused until wake_up(). Returns the bytes
        freed."""
        if self.has_unfinished_requests() or self._pending is not None:
            raise ValueError("sleep: requests are unfinished; sleep between generations")
        self.reset_prefix_cache()
        return self.worker.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Takes the memory back: all of it (tags None), or ["weights"] then ["kv_cache"] (new weights loaded in
        between, while the cache still sleeps)."""
        self.worker.wake_up(tags)

    def is_sleeping(self) -> bool:
        """True while anything sleeps (the weights or the KV cache): requests are refused then."""
        return self.worker.is_sleeping()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (the CPU tier's too), e.g. after new weights; False while requests hold
        blocks."""
        return self.scheduler.reset_prefix_cache()

    def get_stats(self) -> dict:
        s = self.scheduler
        return {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "num_free_blocks": s.num_free_blocks(),
            "num_total_blocks": self.worker.num_kv_blocks,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            **({"cpu_prefix_cache_hits": s.kv_cache.cpu_prefix_cache_hits,
                "num_cpu_kv_blocks": s.kv_cache.cpu.num_blocks} if s.kv_cache.cpu is not None else {}),
            "num_preemptions": s.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "kernel_compiles_while_serving": serving_compiles(),
            **self._lora_stats(),
            **({"spec_decode": s.spec_stats.as_dict()} if s.proposer is not None else {}),
        }

    def _lora_stats(self) -> dict:
        """With LoRA: the adapters of the running and of the waiting requests (names, sorted), and max_loras."""
        if self._lora_manager is None:
            return {}
        s = self.scheduler

        def names(requests) -> list[str]:
            return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})

        return {"running_lora_adapters": names(s.running), "waiting_lora_adapters": names(s.waiting),
                "max_loras": self.config.max_loras}


class KVOccupancy:
    """The KV cache's use over the steps of a run (Scheduler.kv_occupancy after each schedule): the slots held by
    requests and, of them, the empty ones (PagedAttention's waste), averaged over the steps and at their worst, and
    the requests running at once."""

    def __init__(self, total_slots: int) -> None:
        self.total_slots = total_slots
        self.steps = 0
        self.held = 0  # sums over the steps
        self.empty = 0
        self.running = 0
        self.peak_held = 0
        self.peak_running = 0
        self.worst_empty_pct = 0.0

    def add(self, scheduler: Any) -> None:
        held, empty = scheduler.kv_occupancy()
        running = len(scheduler.running)
        self.steps += 1
        self.held += held
        self.empty += empty
        self.running += running
        self.peak_held = max(self.peak_held, held)
        self.peak_running = max(self.peak_running, running)
        if held:
            self.worst_empty_pct = max(self.worst_empty_pct, 100.0 * empty / held)

    def summary(self) -> dict | None:
        if not self.steps:
            return None
        return {
            "total_slots": self.total_slots,
            "mean_used_pct": 100.0 * self.held / (self.steps * self.total_slots),
            "peak_used_pct": 100.0 * self.peak_held / self.total_slots,
            "empty_pct": 100.0 * self.empty / self.held if self.held else 0.0,
            "worst_step_empty_pct": self.worst_empty_pct,
            "mean_running": self.running / self.steps,
            "peak_running": self.peak_running,
        }


@dataclass(slots=True)
class StepTiming:
    """Where the engine's wall time goes, by kind of step: seconds in the scheduler, in the
    runner (device time included: it ends with the sampled ids on the host), and in updating,
    detokenizing and building outputs. Cheap enough to keep on always."""

    # kind -> [steps, tokens, schedule_s, execute_s, output_s, slowest execute_s, slowest's (step, tokens, seqs),
    #          device_s, steps with a device time]
    totals: dict = field(default_factory=dict)

    def add(self, out: SchedulerOutput, schedule_s: float, execute_s: float, output_s: float,
            device_s: float | None = None, launch_s: float | None = None) -> None:
        """device_s: the device's own time on the step (CUDA events, async steps), when known;
        launch_s: the host's part of execute_s (inputs, launches) when the step was async."""
        decode = all(len(r.token_ids) == 1 for r in out.scheduled)
        kind = "decode" if decode else "mixed"
        row = self.totals.setdefault(kind, [0, 0, 0.0, 0.0, 0.0, 0.0, None, 0.0, 0, 0.0])
        row[0] += 1
        row[1] += out.num_batched_tokens
        row[2] += schedule_s
        row[3] += execute_s
        row[4] += output_s
        if execute_s > row[5]:  # a one-off (a kernel compiling) shows here, not in the mean
            row[5] = execute_s
            row[6] = (sum(r[0] for r in self.totals.values()), out.num_batched_tokens, len(out.scheduled))
        if device_s is not None:
            row[7] += device_s
            row[8] += 1
        if launch_s is not None:
            row[9] += launch_s

    def summary(self) -> str:
        parts = []
        for kind, row in sorted(self.totals.items()):
            steps, tokens, sched, execute, output, slowest, where, device, device_steps, launch = row
            per = 1e3 / max(steps, 1)
            at = f" at step {where[0]}: {where[1]} tokens, {where[2]} seqs" if where else ""
            # device: the device's time per step; with async steps the host's share overlaps it.
            dev = f", device {device * 1e3 / device_steps:.2f}" if device_steps else ""
            # launch: the host's part of execute (mean); the slowest is the slowest execute, not device time.
            launched = f", of which launch {launch * per:.2f}" if launch else ""
            parts.append(f"{kind}: {steps} steps, {tokens / max(steps, 1):.0f} tokens/step, ms/step: "
                         f"schedule {sched * per:.2f}, execute {execute * per:.2f}{launched} (slowest execute "
                         f"{slowest * 1e3:.1f}{at}), output {output * per:.2f}{dev}")
        return "; ".join(parts)


def _snapshot(o: CompletionOutput) -> CompletionOutput:
    """A copy callers may keep: the engine goes on appending to its own lists (built directly:
    dataclasses.replace costs several times more, for every request of every step)."""
    return CompletionOutput(o.index, o.text, o.token_ids[:], o.cumulative_logprob,
                            None if o.logprobs is None else o.logprobs[:], o.finish_reason, o.stop_reason)


def stop_token_ends_text(params: SamplingParams, token_ids: list[int], finish_reason: str | None,
                         eos_token_ids: set[int]) -> bool:
    """Whether the last of `token_ids` is a stop token (eos, unless ignore_eos, or one of stop_token_ids) that
    ended the request, so its text leaves it out (vLLM's rule; include_stop_str_in_output keeps it). The one rule
    of the engine's own text and of the text the server makes (engine_process.DeltaDecoder)."""
    if finish_reason != "stop" or params.include_stop_str_in_output or len(token_ids) <= params.min_tokens:
        return False
    last = token_ids[-1]
    return last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids)


def _salted(*salts: str | None) -> str | None:
    """The prefix-cache namespace of a request: its salts joined (None: the shared namespace)."""
    parts = [s for s in salts if s is not None]
    return "|".join(parts) if parts else None


def needs_engine_text(params: SamplingParams) -> bool:
    """Whether the engine must detokenize a request even with LLMEngine.detokenize off: a stop string
    ends the request, which the scheduler must learn at once. The engine process's DeltaDecoder makes
    the text of every other request on the server side."""
    return bool(params.stop)
