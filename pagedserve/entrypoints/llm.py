"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedserve.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.lora import LoRARequest
from pagedserve.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagedserve.pooling_params import PoolingParams, score_pairs
from pagedserve.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]  # (pagedserve.inputs: TextPrompt / TokensPrompt, vLLM's names)


class LLM:
    """Batch generation on one engine. `model=None` uses the embedded default model.

    Engine arguments are EngineConfig's fields, e.g. LLM(model, max_model_len=4096, block_size=16).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        if self.config.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 is served by `pagedserve serve --data-parallel-size N` (one "
                             "engine process a replica); LLM runs one replica: start one LLM per device instead")
        self.engine = LLMEngine(self.config)
        self.engine.clip_max_tokens = True  # as vLLM's LLM: generation stops where the context is full
        self._next_id = 0

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer, as vLLM's LLM.get_tokenizer returns it (`tokenizer(text)`,
        `apply_chat_template(...)` giving token ids by default, `decode` keeping special tokens by default, ...).
        The engine's own wrapper, with the chat template in use and every EOS id: `llm.engine.tokenizer`."""
        return self.engine.tokenizer.hf

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine (vLLM's name for it; `engine` here)."""
        return self.engine

    def load_weights(self, weights: Any) -> int:
        """New values for the model's weights between generations (e.g. a policy update in RL training): a folder
        of safetensors, a dict or (name, tensor) pairs, named as in the model's checkpoint (a Transformers model's
        named_parameters() / state_dict()), any dtype or device; a subset is fine. The prefix cache is forgotten
        after. Returns how many tensors were applied; ValueError for unknown names or shapes, quantized models,
        tensor parallelism, or while requests are unfinished."""
        return self.engine.load_weights(weights)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None) -> None:
        """Joins a trainer's process group (rank 0 the trainer, this engine rank `rank_offset`; nccl on CUDA, gloo
        on CPU) for update_weights_from_distributed; blocks until every rank came. SGLang's call."""
        self.engine.init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                              backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group") -> int:
        """Receives the named tensors (checkpoint names; dtypes as "bfloat16" / "torch.float32"; shapes) as the
        trainer broadcasts them from rank 0, in that order, into the model; returns how many. SGLang's call."""
        return self.engine.update_weights_from_distributed(names, dtypes, shapes, group_name)

    def sleep(self, level: int = 1) -> int:
        """Frees the device memory of the weights and the KV cache between generations (vLLM's sleep mode): level 1
        keeps the weights in host memory, level 2 discards them (wake_up(["weights"]), load_weights(...), then
        wake_up(["kv_cache"])). Returns the bytes freed. ValueError for a level other than 1 or 2, or level 2 on a
        model load_weights cannot update."""
        return self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Takes the memory back: everything (None), or a subset of ["weights", "kv_cache"]."""
        self.engine.wake_up(tags)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (the CPU tier's too), e.g. after new weights; False while requests run."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (temperature, top_p, top_k,
        min_p, repetition_penalty); what generate() and chat() use when given no sampling parameters."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt: a string, a list of token ids, or {"prompt": ...} /
        {"prompt_token_ids": [...]}. Returns one RequestOutput per prompt, in order. lora_request: one adapter for
        every prompt, or one (or None) per prompt (an engine built with enable_lora=True). priority: one per prompt,
        lower first (an engine built with scheduling_policy="priority")."""
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []  # (as vLLM's: nothing to generate)
        return self._run(_normalize_prompts(prompts), sampling_params, use_tqdm, lora_request, priority)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (as generate's prompts), as vLLM's LLM.beam_search: every step extends each
        live beam by one token through generate (max_tokens 1, 2 * beam_width logprobs; the prefix cache holds the
        beams' shared tokens); see beam_search.py. Returns one BeamSearchOutput per prompt: its best beam_width
        sequences, best first (`.tokens` prompt and answer, `.text` the answer, `.cum_logprob`). concurrency_limit:
        search at most this many prompts at a time (vLLM's; None: all at once)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError("beam_search takes a BeamSearchParams")
        if concurrency_limit is not None and (type(concurrency_limit) is not int or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
        prompts = _normalize_prompts(prompts)
        loras = _per_prompt(lora_request, LoRARequest, len(prompts), "LoRA requests")
        tokenizer = self.engine.tokenizer
        searches = []
        for prompt in prompts:
            text, token_ids = _split_prompt(prompt)
            searches.append(BeamSearch(token_ids if token_ids is not None else tokenizer.encode(text), params,
                                       tokenizer.eos_token_ids))
        step = params.step_params()
        bar = None
        limit = concurrency_limit or len(searches)
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=params.max_tokens * -(-len(searches) // limit), desc="Beam search steps",
                       dynamic_ncols=True)
        for start in range(0, len(searches), limit):
            group = range(start, min(start + limit, len(searches)))
            while pending := [(i, tokens) for i in group for tokens in searches[i].pending()]:
                outs = self._run([{"prompt_token_ids": tokens} for _, tokens in pending], step, False,
                                 [loras[i] for i, _ in pending], token_texts=False)
                results: dict[int, list] = {i: [] for i in group}
                for (i, _), out in zip(pending, outs, strict=True):
                    results[i].append(out.outputs[0].logprobs[0])
                for i, result in results.items():
                    if result:
                        searches[i].advance(result)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [search.result(tokenizer.decode) for search in searches]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (as generate's prompts): the final hidden state of its last token, L2-normalized
        unless pooling_params says otherwise (pooling_params.py). `.outputs.embedding` is a list of floats. The
        prompts run through the same batches, chunks and prefix cache as generated requests."""
        prompts = _normalize_prompts(prompts)
        params = [SamplingParams.for_pooling(p)
                  for p in _per_prompt(pooling_params, PoolingParams, len(prompts), "pooling params")]
        return [EmbeddingRequestOutput(out.request_id, out.prompt_token_ids, EmbeddingOutput(out.embedding))
                for out in self._run(prompts, params, use_tqdm, lora_request)]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """A sequence classification model's class probabilities for each prompt (as generate's prompts): its score
        head on the last token's final hidden state, softmax over the labels (a sigmoid for one label), as vLLM's
        LLM.classify. `.outputs.probs` is a list of floats; the label names are `llm.engine.class_labels`."""
        prompts = _normalize_prompts(prompts)
        params = [SamplingParams.for_pooling(PoolingParams(task="classify")) for _ in prompts]
        return [ClassificationRequestOutput(out.request_id, out.prompt_token_ids, ClassificationOutput(out.embedding))
                for out in self._run(prompts, params, use_tqdm, lora_request)]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[ScoringRequestOutput]:
        """The similarity of each (text_1, text_2) pair, as vLLM's LLM.score: for an embedding model the cosine of
        the two texts' embeddings (embed's, normalized; each distinct text embedded once); for a one-label sequence
        classifier (a cross-encoder reranker) its probability for the pair's two texts tokenized together (the
        tokenizer's pair encoding, as vLLM forms cross-encoder inputs). Pairs 1:1, 1:N (one text_1 with every
        text_2) or N:N. Returns one ScoringRequestOutput per pair (`.outputs.score`)."""
        pairs = score_pairs(text_1 if isinstance(text_1, str) else list(text_1),
                            text_2 if isinstance(text_2, str) else list(text_2))
        if self.engine.class_labels is not None:
            if len(self.engine.class_labels) != 1:
                raise ValueError(f"scoring needs an embedding model or a one-label classifier (a cross-encoder); "
                                 f"this classifier has {len(self.engine.class_labels)} labels: use classify")
            tokenizer = self.engine.tokenizer
            prompts = [{"prompt_token_ids": tokenizer.encode_pair(a, b)} for a, b in pairs]
            return [ScoringRequestOutput(str(i), out.prompt_token_ids, ScoringOutput(out.outputs.probs[0]))
                    for i, out in enumerate(self.classify(prompts, use_tqdm, lora_request))]
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        embedded = dict(zip(texts, self.embed(texts, PoolingParams(normalize=True), use_tqdm, lora_request),
                            strict=True))
        outputs = []
        for i, (a, b) in enumerate(pairs):
            ea, eb = embedded[a], embedded[b]
            score = float(sum(x * y for x, y in zip(ea.outputs.embedding, eb.outputs.embedding, strict=True)))
            ids = ea.prompt_token_ids + eb.prompt_token_ids
            outputs.append(ScoringRequestOutput(str(i), ids, ScoringOutput(score)))
        return outputs

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Applies the chat template to one conversation or a list of them, then generates. The parameters are
        vLLM's LLM.chat's, in its order. chat_template: this call's own template (Jinja text) instead of the
        model's; chat_template_content_format: "auto" | "string" | "openai", how message content reaches the
        template (Tokenizer.apply_chat_template). `tools` (OpenAI's function definitions) go into the template;
        the answer's text holds any call in the model's own format (the server's tool_choice modes parse or
        constrain it). continue_final_message: the last message (an assistant's) is left open and the answer
        continues it (with add_generation_prompt False); chat_template_kwargs: variables the template reads
        (e.g. Qwen3's enable_thinking). mm_processor_kwargs: refused (text-only models)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt=False")
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs: this engine serves text-only models")
        if not isinstance(add_generation_prompt, bool) or not isinstance(continue_final_message, bool):
            raise ValueError("add_generation_prompt and continue_final_message must be True or False")
        extra = dict(chat_template_kwargs or {})
        extra["content_format"] = chat_template_content_format
        if chat_template is not None:
            extra["chat_template"] = chat_template
        if continue_final_message:
            extra["continue_final_message"] = True
        tokenizer = self.engine.tokenizer
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tools=tools, **extra)
            # The template already holds any BOS token: do not add special tokens twice.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self._run(prompts, sampling_params, use_tqdm, lora_request, priority)

    def _run(
        self,
        prompts: list[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
        token_texts: bool = True,
    ) -> list[RequestOutput]:
        """token_texts: the outputs' logprobs entries decode their tokens' texts when read (beam search's need not)."""
        loras = _per_prompt(lora_request, LoRARequest, len(prompts), "LoRA requests")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _per_prompt(sampling_params, SamplingParams, len(prompts), "sampling params")
        ids: list[str] = []
        try:
            for prompt, params, lora, rank in zip(prompts, params_list, loras, priorities, strict=True):
                request_id = str(self._next_id)
                self._next_id += 1
                text, token_ids = _split_prompt(prompt)
                prompt_input = token_ids if token_ids is not None else text
                salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None  # vLLM's prompt field
                self.engine.add_request(request_id, prompt_input, params, prompt_text=text, final_only=True,
                                        lora_request=lora, priority=rank, cache_salt=salt)
                ids.append(request_id)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run_engine(ids, use_tqdm, token_texts)

    def _run_engine(self, ids: list[str], use_tqdm: bool, token_texts: bool = True) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        outputs = [finished[i] for i in ids]
        if token_texts:
            _attach_token_texts(outputs, self.engine.tokenizer)
        return outputs


class _TokenTexts(dict):
    """token id -> its text, decoded when first read; shared by a call's logprobs entries. Pickles as the plain dict
    it has filled (not the tokenizer)."""

    __slots__ = ("_decode",)

    def __init__(self, decode: Any) -> None:
        super().__init__()
        self._decode = decode

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = self._decode([token_id], skip_special_tokens=False)
        return text

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def _attach_token_texts(outputs: list[RequestOutput], tokenizer: Any) -> None:
    """Let each logprobs entry give its tokens' texts (read as vLLM's dict[int, Logprob]: `.decoded_token`): one
    shared table, each text decoded when first read."""
    texts = _TokenTexts(tokenizer.decode)
    for out in outputs:
        for lp in out.prompt_logprobs or ():
            if lp is not None:
                lp.decoded = texts
        for choice in out.outputs:
            for lp in choice.logprobs or ():
                lp.decoded = texts


def _per_prompt(value: Any, one: type, num_prompts: int, what: str) -> list:
    """One value (or None) for every prompt, or a sequence with one per prompt."""
    if value is None or isinstance(value, one):
        return [value] * num_prompts
    values = list(value)
    if len(values) != num_prompts:
        raise ValueError(f"got {len(values)} {what} for {num_prompts} prompts")
    return values


def _normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    return list(prompts)


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        from pagedserve.inputs import EMPTY_ONLY_KEYS, PROMPT_KEYS

        unknown = sorted(set(prompt) - PROMPT_KEYS)
        if unknown:
            raise ValueError(f"a prompt dict holds {', '.join(map(repr, unknown))}; it takes 'prompt', "
                             "'prompt_token_ids' and 'cache_salt'")
        for key in EMPTY_ONLY_KEYS:
            if prompt.get(key):
                raise ValueError(f"prompt {key!r}: this engine serves text-only models")
        text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if text is None and ids is None:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return text, None if ids is None else list(ids)
    if isinstance(prompt, list):
        return None, prompt
    raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
