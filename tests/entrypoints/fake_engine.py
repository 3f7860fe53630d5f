"""A tiny stand-in for LLMEngine with the same API, for fast server tests without a model.

Tokenizer: one token per UTF-8 byte (ids 0..255), EOS = 256. Each step every running sequence
emits the next byte of "the quick brown fox jumps over the lazy dog. " (rotated by the seed, or
by the choice index), so outputs are predictable. KV blocks: each running sequence holds
ceil(tokens / block_size) blocks; finishing or aborting frees them at once.
"""

from __future__ import annotations

import math
import threading
import time

from pagedserve.core.outputs import TokenLogprobs
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams

TEXT = "the quick brown fox jumps over the lazy dog. "
EOS = 256


class FakeTokenizer:
    eos_token_id = EOS
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if not skip_special_tokens:
            return "".join("<eos>" if i == EOS else bytes([i]).decode("utf-8", errors="replace") for i in ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [chr(i) if i < 256 else "<eos>" for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            tools=None, enable_thinking: bool = True, chat_template=None, content_format="auto"):
        if chat_template is not None:  # a request's own template: "{last}" is the last message's text
            return chat_template.replace("{last}", str(messages[-1]["content"]))
        parts = [] if enable_thinking else ["<no_think>"]
        if content_format != "auto":  # the server's --chat-template-content-format, shown in the prompt
            parts.append(f"<{content_format}>")
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                if any(p.get("type") != "text" for p in content):
                    raise ValueError("only text content is supported")
                content = "\n".join(p["text"] for p in content)
            parts.append(f"<{m['role']}>{content}\n")
        if add_generation_prompt:
            parts.append("<assistant>")
        return "".join(parts)


class _Seq:
    def __init__(self, index: int, offset: int) -> None:
        self.index = index
        self.offset = offset
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason = None


class _Req:
    def __init__(self, request_id, prompt_ids, params: SamplingParams, max_tokens: int, arrival: float,
                 text: str = TEXT) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.metrics = RequestMetrics(arrival)
        seed = params.seed or 0
        self.text = text
        self.seqs = [_Seq(i, (seed + i) % len(text)) for i in range(params.n)]
        self.running = False


class FakeEngine:
    def __init__(
        self,
        max_model_len: int = 256,
        max_num_seqs: int = 8,
        num_blocks: int = 256,
        block_size: int = 16,
        step_delay: float = 0.002,
        fail_at_step: int | None = None,
        text: str = TEXT,  # what every sequence writes, from its seed's offset, round and round
    ) -> None:
        if not isinstance(max_num_seqs, int):
            raise ValueError(f"max_num_seqs must be an integer, got {max_num_seqs!r}")
        self.tokenizer = FakeTokenizer()
        self.extra_stats: dict = {}  # more stats keys, as some engine configurations report them
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.vocab_size = 257
        self.max_num_seqs = max_num_seqs
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.text = text
        self.num_steps = 0
        self._reqs: dict[str, _Req] = {}
        self._order: list[str] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.calling_threads: set[int] = set()

    def _touch(self) -> None:
        self.calling_threads.add(threading.get_ident())

    def add_request(self, request_id, prompt, params, arrival_time=None, prompt_text=None, cache_salt=None) -> None:
        self._touch()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if request_id in self._reqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate_for_model(self.vocab_size)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room or room <= 0:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(ids)} prompt tokens plus max_tokens {max_tokens} make "
                f"{len(ids) + max_tokens}; reduce the prompt or max_tokens"
            )
        self._reqs[request_id] = _Req(request_id, ids, params, max_tokens, arrival_time or time.monotonic(),
                                      self.text)
        self._order.append(request_id)
        self.prompt_tokens_total += len(ids) * params.n

    def abort_request(self, request_id) -> None:
        self._touch()
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self._reqs.pop(rid, None) is not None:
                self._order.remove(rid)

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self._reqs)

    def _running(self) -> list[_Req]:
        running, num_seqs = [], 0
        for rid in self._order:
            r = self._reqs[rid]
            if num_seqs + r.params.n > self.max_num_seqs:
                break
            running.append(r)
            num_seqs += r.params.n
        return running

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("simulated engine failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        now = time.monotonic()
        outputs = []
        for r in self._running():
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = now
            for s in r.seqs:
                if s.finish_reason is not None:
                    continue
                tok = ord(r.text[(s.offset + len(s.token_ids)) % len(r.text)])
                s.token_ids.append(tok)
                self.generation_tokens_total += 1
                if r.params.logprobs is not None:
                    top = [(tok, -0.5), (ord("z"), -1.5), (ord("q"), -2.5)][: max(r.params.logprobs, 1)]
                    top += [(ord("a") + k, -3.0 - k) for k in range(max(0, r.params.logprobs - 3))]
                    s.logprobs.append(TokenLogprobs(tok, -0.5, 1, top[: r.params.logprobs]))
                s.text = self.tokenizer.decode(s.token_ids)
                for stop in r.params.stop:
                    i = s.text.find(stop)
                    if i != -1:
                        s.text, s.finish_reason, s.stop_reason = s.text[:i], "stop", stop
                        break
                if s.finish_reason is None and len(s.token_ids) >= r.max_tokens:
                    s.finish_reason = "length"
            r.metrics.first_token_time = r.metrics.first_token_time or now
            r.metrics.last_token_time = now
            finished = all(s.finish_reason is not None for s in r.seqs)
            if finished:
                r.metrics.finished_time = now
                del self._reqs[r.request_id]
                self._order.remove(r.request_id)
            outputs.append(
                RequestOutput(
                    request_id=r.request_id,
                    prompt=None,
                    prompt_token_ids=r.prompt_ids,
                    outputs=[
                        CompletionOutput(
                            s.index,
                            s.text,
                            list(s.token_ids),
                            None,
                            list(s.logprobs) if r.params.logprobs is not None else None,
                            s.finish_reason,
                            s.stop_reason,
                        )
                        for s in r.seqs
                    ],
                    finished=finished,
                    metrics=RequestMetrics(
                        **{
                            k: getattr(r.metrics, k)
                            for k in (
                                "arrival_time",
                                "first_scheduled_time",
                                "first_token_time",
                                "last_token_time",
                                "finished_time",
                            )
                        }
                    ),
                    # Prompt token i (from the second on): logprob -0.25 * i, rank i, top "p" and "q".
                    prompt_logprobs=None if r.params.prompt_logprobs is None else [None] + [
                        TokenLogprobs(t, -0.25 * i, i, [(ord("p"), -0.1), (ord("q"), -0.2)][: r.params.prompt_logprobs])
                        for i, t in enumerate(r.prompt_ids[1:], start=1)],
                )
            )
        return outputs

    def _used_blocks(self) -> int:
        used = 0
        for r in self._running():
            for s in r.seqs:
                used += math.ceil((len(r.prompt_ids) + len(s.token_ids)) / self.block_size)
        return used

    def get_stats(self) -> dict:
        self._touch()
        running = self._running()
        used = self._used_blocks()
        return {
            "num_running": sum(r.params.n for r in running),
            "num_waiting": sum(r.params.n for r in self._reqs.values()) - sum(r.params.n for r in running),
            "kv_cache_usage": used / self.num_blocks,
            "num_free_blocks": self.num_blocks - used,
            "num_total_blocks": self.num_blocks,
            "prefix_cache_queries": self.prompt_tokens_total,
            "prefix_cache_hits": 0,
            "num_preemptions": 0,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            **self.extra_stats,
        }
