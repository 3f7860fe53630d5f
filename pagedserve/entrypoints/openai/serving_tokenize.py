"""vLLM's tokenizer endpoints: POST /tokenize (a prompt, or chat messages through the chat template, exactly as
/v1/chat/completions renders them) and POST /detokenize (token ids to text). Clients use them to count tokens
against max_model_len before they send a request, and to see what the template makes of a conversation."""

from __future__ import annotations

from typing import Any

from pagedserve.async_engine import AsyncEngine
from pagedserve.entrypoints.openai.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from pagedserve.entrypoints.openai.serving_base import bad_request, check_model
from pagedserve.entrypoints.openai.serving_chat import checked_tools, render_chat_prompt


class OpenAIServingTokenization:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        check_model(self.engine, self.served_model_names, req.model)
        tokenizer = self.engine.tokenizer
        if isinstance(req, TokenizeChatRequest):
            # (the tools checked as the chat route checks them: it would refuse what is counted)
            _, ids = await render_chat_prompt(self.engine, req, req.add_generation_prompt, checked_tools(req.tools))
            if req.add_special_tokens:
                ids = _with_special_tokens(tokenizer, ids)
        else:
            ids = await self.engine.run_in_tokenizer_thread(_encode, tokenizer, req.prompt, req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                                "token_strs": None}
        if req.return_token_strs:
            body["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return body

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        check_model(self.engine, self.served_model_names, req.model)
        vocab = self.engine.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise bad_request(f"tokens[{i}] = {t} is not a token id of this model (0 to {vocab - 1})", "tokens")
        try:
            text = await self.engine.run_in_tokenizer_thread(_decode, self.engine.tokenizer, req.tokens)
        except (ValueError, TypeError, OverflowError) as e:  # an id the model has but its tokenizer does not
            raise bad_request(f"the tokens do not decode: {e}", "tokens") from e
        return {"prompt": text}


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def _with_special_tokens(tokenizer: Any, ids: list[int]) -> list[int]:
    """What add_special_tokens=True adds around a text (e.g. a BOS), added around the rendered chat."""
    hf = getattr(tokenizer, "hf", None)
    build = getattr(hf, "build_inputs_with_special_tokens", None)
    return list(build(ids)) if build is not None else ids
