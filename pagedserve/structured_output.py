"""Structured outputs: a request's tokens held to a JSON Schema, a regex, a list of choices or a grammar.

xgrammar (the library vLLM and SGLang use) compiles the constraint against the tokenizer's vocabulary
and keeps one matcher per sequence. Each step, for every constrained row that samples:

    matcher ──fill_next_token_bitmask──► one bit per vocabulary token (int32 words, on the host)
        ──► ScheduledRequest.allowed_token_bitmask ──► Sampler: disallowed logits -> -inf, then sample
    sampled token ──► matcher.accept_token ──► the request stops once the grammar is complete

The mask of step N+1 needs step N's token. With async scheduling the engine queues step N+1's forward first
and, while the device runs it, finishes step N (its tokens into the matchers) and fills N+1's masks, which
the runner hands to the sampler (LLMEngine._step_async, ModelRunner.execute_async's before_sample); the masks
reach the GPU from pinned memory. The tokenizer's vocabulary table (~1 s for 150k tokens) is built on a
background thread (at start-up on CUDA, else at the first constrained request), and compiled grammars are
cached by xgrammar (the same schema compiles once).

The server compiles off the engine's thread (`compile_async`; EngineCore holds the request's acceptance
until its grammar is ready): xgrammar releases the GIL while it compiles, and a constraint can take from
~1 ms (a small schema) to ~0.2 s (a nested one) or ~0.7 s (`[a-z ]{1,4000}`) on one core, which would
otherwise stall every running stream for that long.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pagedserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)
_BATCH_FILL_ROWS = 4  # from this many constrained rows in a step, masks are filled on several threads
_COMPILE_THREADS = 2  # grammars compiled side by side off the engine's thread


def _fill_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class StructuredOutputBackend:
    """Compiles constraints for one tokenizer and model vocabulary; hands out per-sequence matchers."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        # (A test checkpoint's vocabulary can be smaller than its tokenizer's: its stop ids may lie outside.)
        self.stop_token_ids = [t for t in stop_token_ids if 0 <= t < vocab_size]
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on the first large batch
        self._mask_buffer: torch.Tensor | None = None  # see _mask_rows
        self._compiler = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._compiling: dict[str, Future] = {}  # constraint key -> its compile in flight
        self._thread = threading.Thread(target=self._build, args=(hf_tokenizer, self.stop_token_ids),
                                        name="structured-output-init", daemon=True)
        self._thread.start()

    def _build(self, hf_tokenizer: Any, stop_token_ids: list[int]) -> None:
        try:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=stop_token_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        except BaseException as e:  # noqa: BLE001 - reported to the first request that needs it
            self._error = e
        finally:
            self._ready.set()

    @property
    def compiler(self):
        self._ready.wait()
        if self._compiler is None:
            raise ValueError(f"structured outputs are not available on this server: {self._error!r}")
        return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of `spec`; ValueError when it does not compile."""
        compiler = self.compiler
        try:
            any_whitespace = not spec.disable_any_whitespace
            if spec.json_object:  # any JSON object or array, as vLLM's json_object mode
                if any_whitespace:
                    return compiler.compile_builtin_json_grammar()
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                return compiler.compile_json_schema(schema, any_whitespace=any_whitespace)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                # One EBNF alternative per choice, each a string literal (JSON escapes are EBNF's too).
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"the {spec.kind} constraint does not compile: {_first_line(e)}") from None

    def compile_async(self, spec: StructuredOutputsParams) -> Future:
        """compile() on a worker thread; the future holds the grammar or the ValueError. Requests that arrive
        with the same constraint while it compiles share its one compile (later ones hit xgrammar's cache)."""
        key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
        with self._lock:
            future = self._compiling.get(key)
            if future is not None:
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="pagedserve-grammar")
            future = self._pool.submit(self.compile, spec)
            self._compiling[key] = future
        future.add_done_callback(lambda f: self._forget(key, f))
        return future

    def _forget(self, key: str, future: Future) -> None:
        with self._lock:
            if self._compiling.get(key) is future:
                del self._compiling[key]

    def matcher(self, compiled) -> SequenceConstraint:
        import xgrammar as xgr

        # No stop token in the vocabulary: a grammar ends with its last character instead of a stop token.
        return SequenceConstraint(xgr.GrammarMatcher(compiled, terminate_without_stop_token=not self.stop_token_ids))

    def bitmask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill_bitmask(self, constraints: list[SequenceConstraint]) -> torch.Tensor:
        """[len(constraints), words] int32 on the host: bit t of row i is set when token t may come next.
        A grammar that allows nothing at all (e.g. `root ::= root`) gets the stop token, so its request
        ends cleanly instead of sampling from a row of -inf."""
        mask = self._mask_rows(len(constraints))
        if len(constraints) >= _BATCH_FILL_ROWS:  # rows side by side on xgrammar's threads (a row: ~20-700 us)
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(max_threads=_fill_threads())
            self._batch.batch_fill_next_token_bitmask([c.matcher for c in constraints], mask)
        else:
            for i, c in enumerate(constraints):
                c.matcher.fill_next_token_bitmask(mask, i)
        if self.stop_token_ids:
            words = mask.numpy()
            for i in np.flatnonzero(~words.any(axis=1)).tolist():
                stop = self.stop_token_ids[0]
                words[i, stop // 32] |= np.int32(_bit(stop % 32))
                constraints[i].failed = True
        return mask

    def _mask_rows(self, num_rows: int) -> torch.Tensor:
        """The first num_rows rows of one host buffer, reused every step (pinned when CUDA is there, so the
        sampler's copy to the device neither stages nor waits). Reuse is safe: a step's masks are filled only
        after the step before has finished, its copy included."""
        if self._mask_buffer is None or self._mask_buffer.shape[0] < num_rows:
            rows = max(64, 1 << (num_rows - 1).bit_length())
            self._mask_buffer = torch.empty((rows, self.bitmask_words()), dtype=torch.int32,
                                            pin_memory=torch.cuda.is_available())
        return self._mask_buffer[:num_rows]


class SequenceConstraint:
    """One sequence's place in its grammar."""

    __slots__ = ("matcher", "failed")

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.failed = False

    def accept(self, token_ids: list[int]) -> bool:
        """Advances over the sampled tokens; False once one is not allowed (then the sequence must stop)."""
        for t in token_ids:
            if self.failed or self.matcher.is_terminated():
                return False
            if not self.matcher.accept_token(t):
                self.failed = True
                return False
        return True

    @property
    def is_done(self) -> bool:
        """The grammar is complete and its stop token taken: nothing more may be generated."""
        return self.failed or self.matcher.is_terminated()


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor]) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of masks[i] is clear (columns past the masks: -inf too).
    On CUDA the masks travel from pinned memory: a pageable copy of a megabyte (64 rows of a 150k vocabulary)
    would make the host wait for the step's forward to finish before it can go on queueing work. Rows that are
    consecutive in one buffer (the engine's, StructuredOutputBackend._mask_rows) are copied as they lie."""
    if not rows:
        return
    device = logits.device
    num, width_words = len(rows), masks[0].shape[-1]
    first = masks[0]
    if all(m.data_ptr() == first.data_ptr() + 4 * width_words * i for i, m in enumerate(masks)):
        host = first.as_strided((num, width_words), (width_words, 1))  # consecutive rows of the engine's buffer
    else:
        host = torch.empty((num, width_words), dtype=torch.int32, pin_memory=device.type == "cuda")
        torch.stack(masks, out=host)
    words = host.to(device, non_blocking=True)
    index = torch.tensor(rows, dtype=torch.long, pin_memory=device.type == "cuda").to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(num, -1).bool()
    width = logits.shape[1]
    if allowed.shape[1] < width:
        pad = torch.zeros((num, width - allowed.shape[1]), dtype=torch.bool, device=device)
        allowed = torch.cat([allowed, pad], dim=1)
    selected = logits.index_select(0, index)
    selected.masked_fill_(~allowed[:, :width], float("-inf"))
    logits.index_copy_(0, index, selected)


def _bit(k: int) -> int:
    """Bit k of an int32 word, as the signed value torch stores (bit 31 is the sign)."""
    return (1 << k) - (1 << 32) if k == 31 else 1 << k


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # xgrammar's C++ errors start with "[time] file.cc:line: [Check failed: ...: ]": keep what a user can act on.
    text = re.sub(r"^\[[\d:.]+\]\s+\S+:\d+:\s*", "", text)
    for marker in ("Check failed: (error.empty()) is false: ", "Check failed: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.splitlines()[0][:500] if text else type(e).__name__
