"""The OpenAI-compatible HTTP server: FastAPI app factory, flags, uvicorn runner, signals.

    run_server(config, args)        load the engine, build the app, serve until SIGTERM/SIGINT
      └─ build_app(AsyncEngine, ServerSettings) -> FastAPI
            /v1/chat/completions  /v1/completions  /v1/models  /health  /metrics  /version

SIGTERM/SIGINT: stop accepting (listener closed, new submissions get 503), let in-flight requests
finish for up to --shutdown-timeout seconds, cancel (= abort) the rest, stop the engine, exit 0.
A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.async_engine import AsyncEngine
from pagedserve.config import EngineConfig
from pagedserve.entrypoints.openai.cli_serve import (
    API_KEY_ENV,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    add_serve_args,
    enable_stats_logging,
    engine_core_kwargs,
    lora_requests_from_args,
    serve_config_from_args,
    start_engine_process,
)
from pagedserve.entrypoints.openai.metrics import PREFIX, VLLM_PREFIX, ServerMetrics
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    VersionResponse,
)
from pagedserve.entrypoints.openai.serving_base import (
    APIError,
    TokenStrings,
    bad_request,
    engine_error,
    error_body,
    error_response,
)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedserve.entrypoints.openai.serving_messages import AnthropicServingMessages, anthropic_error
from pagedserve.entrypoints.openai.serving_responses import OpenAIServingResponses, ResponsesRequest
from pagedserve.entrypoints.openai.serving_score import (
    ClassifyRequest,
    OpenAIServingScore,
    RerankRequest,
    ScoreRequest,
)
from pagedserve.entrypoints.openai.serving_tokenize import OpenAIServingTokenization
from pagedserve.gc_control import freeze_startup_objects

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerSettings:
    api_key: str | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    shutdown_timeout: float = 30.0
    served_model_names: list[str] = field(default_factory=list)  # default: [engine.model_name]
    model_root: str | None = None
    enable_auto_tool_choice: bool = False  # tool_choice "auto": answers parsed for hermes tool calls
    trust_request_chat_template: bool = False  # a request's own chat_template is rendered (else a 400)
    chat_template_content_format: str = "auto"  # "auto" | "string" | "openai" (Tokenizer.apply_chat_template)
    # "qwen3" | "deepseek_r1" | "gpt_oss": chat answers split into reasoning / content (entrypoints/openai/reasoning.py)
    reasoning_parser: str | None = None
    lora_modules: dict = field(default_factory=dict)  # served name -> LoRARequest (--lora-modules)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (--allow-runtime-lora-updating, or vLLM's
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); off by default, as in vLLM: with it, any API caller can make the server
    # read any folder it can reach as an adapter.
    allow_runtime_lora_updating: bool = False
    # CORS, as vLLM's defaults: any origin, method and header; no credentials.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs tokens as "token_id:N" unless a request says otherwise
    vllm_metric_names: bool = False  # /metrics as vllm:* (vLLM's dashboards) instead of pagedserve:*
    # POST /update_weights_from_disk (--enable-weight-updates): new weights from a folder on the server's machine
    # (SGLang's route, for reinforcement-learning loops); off by default: any API caller could swap the model.
    enable_weight_updates: bool = False
    # usage.prompt_tokens_details.cached_tokens on chat and completions (vLLM's --enable-prompt-tokens-details;
    # the Responses and Messages routes always report their cache reads)
    enable_prompt_tokens_details: bool = False
    docs: bool = True  # /docs, /redoc and /openapi.json (vLLM's --disable-fastapi-docs turns them off)
    response_role: str = "assistant"  # the chat answers' role (vLLM's --response-role)


def _version() -> str:
    try:
        from pagedserve import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------- middleware
def _needs_key(path: str) -> bool:
    """The API's routes need --api-key's key; /health, /ping, /metrics, /version and the schema stay open."""
    return path.startswith(("/v1", "/v2")) or path in ("/tokenize", "/detokenize", "/score", "/rerank", "/classify",
                                                        "/invocations", "/reset_prefix_cache", "/sleep", "/wake_up",
                                                        "/is_sleeping", "/update_weights_from_disk",
                                                        "/init_weights_update_group",
                                                        "/update_weights_from_distributed")


class _InternalErrorMiddleware:
    """A route's unexpected exception (a bug) answered as a 500 OpenAI error here, inside the app (a ValueError, this
    project's "bad input", as a 400 where a route did not map it itself). Left to
    Starlette's outermost error middleware it is answered too, but then re-raised to the server, which logs it again
    and drops the keep-alive connection without saying so: the client's next request on it failed with a reset.
    An exception after the response started (a stream) goes on up: nothing can be answered any more. A cancellation
    (the server cancels the requests still running when --shutdown-timeout ends) is answered as the 503 a request
    arriving during shutdown gets (uvicorn answered a plain-text 500)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if started:
                raise
            from pagedserve.async_engine import ShuttingDownError

            error = engine_error(ShuttingDownError("the server is shutting down (its shutdown timeout ended before "
                                                   "this request finished); retry"))
            logger.warning("%s %s: cancelled at shutdown, answered 503", scope.get("method"), scope.get("path"))
            await error_response(error)(scope, receive, send)
        except Exception as e:
            if started:
                raise
            if isinstance(e, ValueError):  # the project's "bad input" everywhere: a route that did not map it
                logger.warning("%s %s: ValueError answered as a 400: %s", scope.get("method"), scope.get("path"), e)
                error = APIError(400, str(e), "invalid_request_error")
            else:
                logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                error = APIError(500, f"internal server error: {type(e).__name__}", "server_error")
            await error_response(error)(scope, receive, send)


class _GateMiddleware:
    """Pure ASGI (streaming-safe): API key on /v1/*, and the request body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.api_key is not None and _needs_key(scope["path"]) and scope["method"] != "OPTIONS":
            auth = headers.get(b"authorization", b"")
            # a bearer token (OpenAI's clients), or x-api-key (Anthropic's)
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
            # compare_digest: the time taken does not tell how much of the key matched.
            if not hmac.compare_digest(token, self.api_key):
                await _send_error(
                    send,
                    401,
                    error_body(
                        "missing or invalid API key: send 'Authorization: Bearer <key>'",
                        "invalid_request_error",
                        None,
                        "invalid_api_key",
                    ),
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                too_large = False
            if too_large:
                await _send_error(send, 413, _too_large_body(self.max_body_bytes))
                return
        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, _too_large_body(limit)["error"]["message"])
            return message

        await self.app(scope, limited_receive, send)


def _too_large_body(limit: int) -> dict:
    return error_body(
        f"the request body is larger than {limit} bytes (--max-request-body-bytes)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def _send_error(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- app
_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    503: {
        "model": ErrorResponse,
        "description": "queue full, shutting down, or engine dead (see Retry-After)",
    },
}


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    served_names = settings.served_model_names or [engine.model_name]
    # A request may name the base model or one of its LoRA adapters.
    engine.lora_requests = dict(settings.lora_modules)
    engine.trust_request_chat_template = settings.trust_request_chat_template
    engine.chat_template_content_format = settings.chat_template_content_format
    served_names = served_names + [name for name in settings.lora_modules if name not in served_names]
    started = int(time.time())
    token_strings = TokenStrings(engine.tokenizer)
    chat = OpenAIServingChat(engine, served_names, token_strings, settings.enable_auto_tool_choice,
                             settings.reasoning_parser)
    completion = OpenAIServingCompletion(engine, served_names, token_strings)
    chat.tokens_as_ids = completion.tokens_as_ids = settings.return_tokens_as_token_ids
    chat.prompt_tokens_details = completion.prompt_tokens_details = settings.enable_prompt_tokens_details
    chat.response_role = settings.response_role
    responses = OpenAIServingResponses(chat)
    messages = AnthropicServingMessages(chat)
    tokenization = OpenAIServingTokenization(engine, served_names)
    embedding = OpenAIServingEmbedding(engine, served_names)
    scoring = OpenAIServingScore(engine, served_names)
    metrics = ServerMetrics(engine, served_names[0], VLLM_PREFIX if settings.vllm_metric_names else PREFIX)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has already waited for the in-flight requests (the engine aborted those still running at
        # --shutdown-timeout: begin_shutdown); stop the engine thread now.
        await engine.shutdown(timeout=min(5.0, settings.shutdown_timeout))

    app = FastAPI(
        title="pagedserve",
        version=_version(),
        lifespan=lifespan,
        description="OpenAI-compatible API of the pagedserve engine; see docs/server.md.",
        **({} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_InternalErrorMiddleware)  # innermost: the routes' unexpected errors as 500 JSON answers
    app.add_middleware(_GateMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_request_body_bytes)
    # Outside the gate: a browser's preflight (OPTIONS, no API key) is answered here.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers, allow_credentials=settings.allow_credentials)
    _add_exception_handlers(app)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={
            200: {
                "model": ChatCompletionResponse,
                "description": "a completion; with stream=true, text/event-stream of "
                "chat.completion.chunk objects (ChatCompletionChunk)",
            },
            **_ERROR_RESPONSES,
        },
    )
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(request, raw_request)

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: {"model": CompletionResponse}, **_ERROR_RESPONSES},
    )
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create(request, raw_request)

    @app.post(
        "/v1/responses",
        response_model=None,
        responses={200: {"description": "a response object; with stream=true, text/event-stream of the Responses "
                                        "API's typed events"}, **_ERROR_RESPONSES},
    )
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        return await responses.create(request, raw_request)

    @app.post("/v1/messages", response_model=None,
              responses={200: {"description": "an Anthropic Messages API message; with stream=true, text/event-stream "
                                              "of its events (docs/server.md)"}})
    async def create_message(raw_request: Request) -> Response:
        try:
            body = await json_body(raw_request)
        except APIError as e:
            return anthropic_error(e)
        return await messages.create(body, raw_request)

    @app.post("/v1/messages/count_tokens", response_model=None)
    async def count_message_tokens(raw_request: Request) -> Response:
        try:
            body = await json_body(raw_request)
        except APIError as e:
            return anthropic_error(e)
        return await messages.count_tokens(body)

    @app.get("/v1/responses/{response_id}", responses=_ERROR_RESPONSES)
    async def retrieve_response(response_id: str) -> Response:
        return JSONResponse(responses.store.get(response_id)[0])

    @app.delete("/v1/responses/{response_id}", responses=_ERROR_RESPONSES)
    async def delete_response(response_id: str) -> Response:
        responses.store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @app.post("/v1/embeddings", response_model=None,
              responses={200: {"model": EmbeddingResponse}, **_ERROR_RESPONSES})
    async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
        return await embedding.create(request, raw_request)

    @app.post("/score", response_model=None, responses=_ERROR_RESPONSES)
    @app.post("/v1/score", response_model=None, responses=_ERROR_RESPONSES)
    async def create_score(request: ScoreRequest, raw_request: Request) -> Response:
        return await scoring.score(request, raw_request)

    @app.post("/reset_prefix_cache", response_model=None, responses=_ERROR_RESPONSES)
    async def reset_prefix_cache() -> Response:
        """vLLM's: forget the prefix cache (e.g. after new weights); a 400 while requests hold KV blocks."""
        await control(engine.reset_prefix_cache(), None)
        return JSONResponse({"status": "ok"})

    @app.post("/invocations", response_model=None, responses=_ERROR_RESPONSES)
    async def invocations(raw_request: Request) -> Response:
        """SageMaker's inference route, as vLLM serves it: the body's shape picks the API (`messages`: chat
        completions; `prompt`: completions; `input`: embeddings, or classification on a classifier)."""
        body = await json_object(raw_request)
        try:
            if "messages" in body:
                return await chat.create(ChatCompletionRequest.model_validate(body), raw_request)
            if "prompt" in body:
                return await completion.create(CompletionRequest.model_validate(body), raw_request)
            if "input" in body and engine.class_labels is not None:
                return await scoring.classify(ClassifyRequest.model_validate(body), raw_request)
            if "input" in body:
                return await embedding.create(EmbeddingRequest.model_validate(body), raw_request)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        raise bad_request("/invocations needs messages (chat), prompt (completions) or input (embeddings, "
                          "classification)", None)

    @app.post("/classify", response_model=None, responses=_ERROR_RESPONSES)
    @app.post("/v1/classify", response_model=None, responses=_ERROR_RESPONSES)
    async def create_classification(request: ClassifyRequest, raw_request: Request) -> Response:
        return await scoring.classify(request, raw_request)

    @app.post("/rerank", response_model=None, responses=_ERROR_RESPONSES)
    @app.post("/v1/rerank", response_model=None, responses=_ERROR_RESPONSES)
    @app.post("/v2/rerank", response_model=None, responses=_ERROR_RESPONSES)
    async def create_rerank(request: RerankRequest, raw_request: Request) -> Response:
        return await scoring.rerank(request, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(request: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        return await tokenization.tokenize(request)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(request: DetokenizeRequest) -> dict:
        return await tokenization.detokenize(request)

    def model_card(name: str) -> dict:
        lora = engine.lora_requests.get(name)
        if lora is not None:  # vLLM's card of an adapter: its folder as root, the base model as parent
            return ModelCard(id=name, created=started, root=lora.lora_path, parent=served_names[0],
                             max_model_len=engine.max_model_len).model_dump()
        return ModelCard(
            id=name, created=started, root=settings.model_root, max_model_len=engine.max_model_len
        ).model_dump()

    if settings.allow_runtime_lora_updating:
        _add_lora_routes(app, engine, served_names)
    if getattr(engine.engine_config, "enable_sleep_mode", False):
        _add_sleep_routes(app, engine)
    if settings.enable_weight_updates:
        _add_weight_update_route(app, engine)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in served_names]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: _ERROR_RESPONSES[404]})
    async def retrieve_model(model_id: str) -> dict:
        if model_id not in served_names:
            raise APIError(
                404,
                f"The model `{model_id}` does not exist.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return model_card(model_id)

    @app.api_route(
        "/ping",  # vLLM's (SageMaker's) health check, GET or POST: as /health
        methods=["GET", "POST"],
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse, "description": "the engine has died"}},
    )
    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse, "description": "the engine has died"}},
    )
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(
                error_body(f"the engine has stopped: {engine.dead_error!r}", "server_error", None, "engine_dead"),
                status_code=503,
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version", response_model=VersionResponse)
    async def version() -> dict:
        return {"version": _version()}

    _ = ChatCompletionChunk  # documented in the schema via the 200 description; keep the import used
    return app


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        param = None
        parts = []
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                loc = []  # its loc is a character position, not a field
            if param is None and loc:
                param = ".".join(loc)
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            else:
                parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        message = "; ".join(parts) or "invalid request"
        return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return JSONResponse(
            error_body(str(e.detail), "invalid_request_error", None, code),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        logger.exception("unhandled error")
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}", "server_error"), status_code=500)


# --------------------------------------------------------------------------- runner
_SHUTDOWN_BACKSTOP_S = 5.0


def _make_uvicorn_server(app: FastAPI, args: argparse.Namespace, on_signal: Callable[[], None]):
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises the signal after a graceful stop (exit status 143); we exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit:
                logger.warning("second signal: exiting now")
                self.force_exit = True
                return
            logger.warning(
                "received %s: not accepting new requests; waiting up to %.0f s for %d in-flight request(s)",
                signal.Signals(sig).name,
                args.shutdown_timeout,
                app.state.engine.num_in_flight,
            )
            on_signal()
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        uds=getattr(args, "uds", None),
        lifespan="on",
        # The engine aborts what is still running at --shutdown-timeout (begin_shutdown), and each route answers it;
        # uvicorn's own deadline, which cancels the tasks and cuts streams mid-body, is the backstop.
        timeout_graceful_shutdown=args.shutdown_timeout + _SHUTDOWN_BACKSTOP_S,
        access_log=not args.disable_access_log,
        log_level=getattr(args, "uvicorn_log_level", "info"),
        ssl_keyfile=getattr(args, "ssl_keyfile", None),
        ssl_certfile=getattr(args, "ssl_certfile", None),
        ssl_ca_certs=getattr(args, "ssl_ca_certs", None),
        root_path=getattr(args, "root_path", None) or "",
    )
    return _Server(config)


async def control(call: Any, param: str | None) -> None:
    """Awaits one of the engine's control calls for a route: its ValueError is a 400 naming `param`; a dead engine, a
    lost replica or a sleeping one the 503 every route gives; anything else a 500 (the engine lives on)."""
    try:
        await call
    except ValueError as e:
        raise bad_request(str(e), param) from None
    except Exception as e:  # noqa: BLE001 - mapped as the generation routes map them
        raise engine_error(e) from None


async def json_body(raw_request: Request) -> Any:
    """A route's body as JSON; a 400 for invalid JSON, or for a Content-Type other than JSON (as the routes whose body
    FastAPI parses answer; none given is taken as JSON)."""
    content_type = raw_request.headers.get("content-type")
    if content_type and content_type.strip():
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise bad_request(f"the body must be JSON (Content-Type: application/json), not {media}", None)
    try:
        return await raw_request.json()
    except (ValueError, RecursionError):  # (RecursionError: arrays nested thousands deep)
        raise bad_request("the body is not valid JSON", None) from None


async def json_object(raw_request: Request) -> dict:
    """A route's body as a JSON object; 400s for invalid JSON or another JSON value."""
    body = await json_body(raw_request)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None)
    return body


def _add_sleep_routes(app: FastAPI, engine: AsyncEngine) -> None:
    """vLLM's sleep-mode routes (--enable-sleep-mode): POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=
    kv_cache], GET /is_sleeping. Refused (400) while requests run; while asleep, requests get a 503
    engine_sleeping."""
    from fastapi import Query

    @app.post("/sleep", response_model=None, responses=_ERROR_RESPONSES)
    async def sleep(level: str = "1") -> Response:
        if level not in ("1", "2"):
            raise bad_request(f"level must be 1 (weights kept in host memory) or 2 (weights discarded), got {level!r}",
                              "level")
        await control(engine.sleep(int(level)), "level")
        return JSONResponse({"status": "ok", "is_sleeping": True, "level": int(level)})

    @app.post("/wake_up", response_model=None, responses=_ERROR_RESPONSES)
    async def wake_up(tags: list[str] | None = Query(default=None)) -> Response:  # noqa: B008 - FastAPI's idiom
        await control(engine.wake_up(tags), "tags")
        return JSONResponse({"status": "ok", "is_sleeping": engine.is_sleeping()})

    @app.get("/is_sleeping", response_model=None)
    async def is_sleeping() -> Response:
        return JSONResponse({"is_sleeping": engine.is_sleeping()})


def _add_weight_update_route(app: FastAPI, engine: AsyncEngine) -> None:
    """POST /update_weights_from_disk {"model_path": FOLDER} (SGLang's route): the folder's safetensors, by checkpoint
    names (a subset allowed), copied into the served model between generations; the prefix cache is forgotten.
    400 while requests run, for a folder that is not there, or names / shapes the model lacks. And SGLang's
    /init_weights_update_group + /update_weights_from_distributed: weights broadcast by a trainer's process."""

    @app.post("/update_weights_from_disk", response_model=None, responses=_ERROR_RESPONSES)
    async def update_weights_from_disk(raw_request: Request) -> Response:
        body = await json_object(raw_request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise bad_request("model_path (a folder of safetensors files on the server's machine) is required",
                              "model_path")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise bad_request(f"load_format must be 'auto' or 'safetensors', got {body['load_format']!r}",
                              "load_format")
        await control(engine.load_weights(path), "model_path")
        return JSONResponse({"success": True, "message": f"weights updated from {path}"})

    @app.post("/init_weights_update_group", response_model=None, responses=_ERROR_RESPONSES)
    async def init_weights_update_group(raw_request: Request) -> Response:
        """SGLang's: join the trainer's process group (executor/weight_sync.py); answers once every rank came."""
        body = await json_object(raw_request)
        fields = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        unknown = sorted(set(body) - set(fields))
        if unknown or any(body.get(f) is None for f in fields[:4]):
            raise bad_request(f"the body takes {', '.join(fields)} (the first four required); got {sorted(body)}",
                              None)
        await control(engine.init_weights_update_group(**{f: body[f] for f in fields if body.get(f) is not None}),
                      None)
        return JSONResponse({"success": True, "message": "joined the weight-update group"})

    @app.post("/update_weights_from_distributed", response_model=None, responses=_ERROR_RESPONSES)
    async def update_weights_from_distributed(raw_request: Request) -> Response:
        """SGLang's: receive the named tensors as the trainer broadcasts them (send this, then broadcast)."""
        body = await json_object(raw_request)
        if body.get("load_format") not in (None, "auto") or body.get("flush_cache") not in (None, True):
            raise bad_request("load_format must be auto and flush_cache true (the prefix cache is always flushed)",
                              None)
        fields = {f: body.get(f) for f in ("names", "dtypes", "shapes")}
        if body.get("group_name") is not None:
            fields["group_name"] = body["group_name"]
        await control(engine.update_weights_from_distributed(**fields), None)
        return JSONResponse({"success": True, "message": f"{len(fields['names'])} tensors updated"})


def _add_lora_routes(app: FastAPI, engine: AsyncEngine, served_names: list[str]) -> None:
    """vLLM's runtime adapter routes: a loaded adapter is served under its name (added to `served_names`, which the
    routes share) until it is unloaded; requests already running with it finish."""
    from starlette.responses import PlainTextResponse

    from pagedserve.lora import LoRARequest, read_adapter, resolve_adapter_path

    # Adapter ids are never given twice: the engine keys an adapter's weights, device slot and prefix-cache blocks by
    # its id, so a reused one served the unloaded adapter (the same name loaded again from new files answered with the
    # old weights; another name was refused as that adapter's id).
    next_ids = itertools.count(max((r.lora_int_id for r in engine.lora_requests.values()), default=0) + 1)

    @app.post("/v1/load_lora_adapter", responses=_ERROR_RESPONSES)
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        name = request.lora_name
        if not getattr(engine.engine_config, "enable_lora", False):
            raise APIError(400, "this server runs without LoRA; start it with --enable-lora", param="lora_name")
        if name in served_names:
            raise APIError(400, f"the adapter {name!r} has already been loaded", param="lora_name")
        config = engine.engine_config
        try:  # read here (checked; the engine reads it again when a request first names it): a Hub repo is
            # downloaded now, and the requests name its local folder
            # (a download in a thread of its own: the tokenizer thread serves every request's tokenization)
            path = await asyncio.to_thread(resolve_adapter_path, request.lora_path, getattr(config, "hf_token", None),
                                           getattr(config, "download_dir", None))
            await engine.run_in_tokenizer_thread(read_adapter, path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from e
        engine.lora_requests[name] = LoRARequest(name, next(next_ids), path)
        served_names.append(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", responses=_ERROR_RESPONSES)
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        name = request.lora_name
        if name not in engine.lora_requests:
            raise APIError(404, f"no adapter {name!r} is loaded", param="lora_name", code="model_not_found")
        del engine.lora_requests[name]
        served_names.remove(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def run_server(config: EngineConfig, args: argparse.Namespace, backend: Any = None) -> int:
    """Loads the engine, serves until SIGTERM/SIGINT, returns 0 after a graceful stop.
    `backend`: an engine process already spawned by start_engine_process (cli_serve does that
    before importing this module, so these imports overlap the engine's start)."""
    from pagedserve.engine import LLMEngine

    kwargs = engine_core_kwargs(config, args)
    lora_modules = getattr(args, "lora_requests", None)
    if lora_modules is None:  # (cmd_serve read them already)
        lora_modules = lora_requests_from_args(args)
    enable_stats_logging(config)
    if backend is not None or getattr(args, "engine_process", True):
        # The step loop in its own process: HTTP work never takes the GIL from it (docs/server.md).
        if backend is None:
            backend = start_engine_process(config, args)
        async_engine = AsyncEngine.in_process(backend=backend, **kwargs)
    else:
        async_engine = AsyncEngine(LLMEngine(config), **kwargs)
    logger.info("engine ready; building the API")
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    engine_config = async_engine.engine_config
    names = getattr(args, "served_model_name", None)
    settings = ServerSettings(
        api_key=api_key,
        served_model_names=list(names) if isinstance(names, list) and len(names) > 1 else [],
        max_request_body_bytes=getattr(args, "max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES),
        shutdown_timeout=args.shutdown_timeout,
        model_root=getattr(engine_config, "model", None),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
        chat_template_content_format=getattr(args, "chat_template_content_format", None) or "auto",
        reasoning_parser=getattr(args, "reasoning_parser", None),
        lora_modules=lora_modules,
        allow_runtime_lora_updating=bool(getattr(args, "allow_runtime_lora_updating", False)
                                         or os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower()
                                         in ("1", "true")),
        enable_weight_updates=bool(getattr(args, "enable_weight_updates", False)),
        enable_prompt_tokens_details=bool(getattr(args, "enable_prompt_tokens_details", False)),
        docs=not getattr(args, "disable_fastapi_docs", False),
        response_role=getattr(args, "response_role", "assistant"),
        allowed_origins=getattr(args, "allowed_origins", ["*"]),
        allowed_methods=getattr(args, "allowed_methods", ["*"]),
        allowed_headers=getattr(args, "allowed_headers", ["*"]),
        allow_credentials=bool(getattr(args, "allow_credentials", False)),
        return_tokens_as_token_ids=bool(getattr(args, "return_tokens_as_token_ids", False)),
        vllm_metric_names=bool(getattr(args, "vllm_metric_names", False)),
    )
    app = build_app(async_engine, settings)
    server = _make_uvicorn_server(app, args, lambda: async_engine.begin_shutdown(args.shutdown_timeout))
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    where = (f"unix socket {args.uds}" if getattr(args, "uds", None) else f"{scheme}://{args.host}:{args.port}")
    logger.info("serving %s on %s (OpenAI API under /v1)", async_engine.model_name, where)
    freeze_startup_objects("API server")  # the app, engine client, tokenizer and templates live until exit
    try:
        server.run()
    finally:
        _remove_unix_socket(getattr(args, "uds", None))
    return 0


def _remove_unix_socket(path: str | None) -> None:
    """Removes the Unix socket file the server listened on (asyncio before Python 3.13 leaves it behind)."""
    if not path:
        return
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="python -m pagedserve.entrypoints.openai",
        description="OpenAI-compatible server (same flags as `pagedserve serve`).",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level of everything but the stats line")
    add_serve_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pagedserve.entrypoints.args import parse_args_with_config

    try:
        args = parse_args_with_config(build_parser(), argv)
    except ValueError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = serve_config_from_args(args)
        return run_server(config, args)
    except ValueError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
