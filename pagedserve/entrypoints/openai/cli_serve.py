"""`pagedserve serve`: registered into the CLI's subcommands by pagedserve.entrypoints.cli."""

from __future__ import annotations

import argparse
import json

from pagedserve.config import EngineConfig
from pagedserve.entrypoints.args import add_engine_args, config_from_args
from pagedserve.entrypoints.openai.reasoning import ALIASES as REASONING_ALIASES
from pagedserve.entrypoints.openai.reasoning import PARSERS as REASONING_PARSERS
from pagedserve.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS

API_KEY_ENV = "PAGEDSERVE_API_KEY"
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20  # 32 MiB: a 1M-token prompt as text or token ids fits (vLLM: no bound)


# --------------------------------------------------------------------------- flags
def _json_list(value: str) -> list[str]:
    """A flag given as a JSON list of strings (as vLLM's CORS flags)."""
    try:
        items = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {value!r}") from e
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return items


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the HTTP server itself (engine flags: pagedserve.entrypoints.args)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM) and --ssl-certfile")
    g.add_argument("--ssl-certfile", default=None, help="the certificate (PEM) for HTTPS")
    g.add_argument("--ssl-ca-certs", default=None, help="CA certificates (PEM) for client certificates")
    g.add_argument("--root-path", default=None, help="the path prefix a proxy serves this app under (ASGI root_path)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    g.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help='CORS: origins allowed to call the API from a browser, as a JSON list (default ["*"])')
    g.add_argument("--allowed-methods", type=_json_list, default=["*"], help='CORS: allowed methods (default ["*"])')
    g.add_argument("--allowed-headers", type=_json_list, default=["*"], help='CORS: allowed headers (default ["*"])')
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")
    g.add_argument("--vllm-metric-names", action="store_true",
                   help="name the Prometheus metrics vllm:* (the names vLLM's Grafana dashboards and alerts read) "
                        "instead of pagedserve:*")
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set); "
        "/health, /metrics and /version stay open",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="refuse new requests with 503 + Retry-After while this many are waiting to be "
        "scheduled (default: no limit)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to let in-flight requests finish before aborting them",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help="larger request bodies get 413 (default 32 MiB)",
    )
    g.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no periodic stats line (throughput, running/waiting, KV cache usage)",
    )
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprobs name each token "token_id:N" (vLLM\'s; a request\'s return_tokens_as_token_ids '
                   "overrides it), for clients that need exact ids")
    g.add_argument("--log-stats-interval", type=float, default=5.0, help="seconds between stats lines while busy")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="chat and completions usage reports prompt_tokens_details.cached_tokens (the prompt tokens "
                        "served from the prefix cache)")
    g.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs, /redoc or /openapi.json")
    g.add_argument("--response-role", default="assistant", help="the role of chat answers (default assistant)")
    g.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this Unix domain socket instead of --host / --port")
    g.add_argument("--disable-access-log", action="store_true", help="no log line per HTTP request")
    add_request_handling_args(g)
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove adapters while serving "
                   "(also VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    g.add_argument("--enable-weight-updates", action="store_true",
                   help="POST /update_weights_from_disk {\"model_path\": FOLDER} loads new weights (safetensors, "
                        "checkpoint names) into the served model between generations, e.g. in a training loop")
    g.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine's step loop in its own process (default), or in a thread of the server "
        "(--no-engine-process: slower under load, as HTTP work then competes for the GIL)",
    )
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="N whole replicas of the engine, each in its own process on its own --tensor-parallel-size "
                   "GPUs (N x tp GPUs in all; on CPU each takes its share of the cores); a request goes to the "
                   "replica with the fewest unfinished requests")
    g.add_argument("--data-parallel-routing", default="cache-aware", choices=["cache-aware", "least-loaded"],
                   help="with --data-parallel-size: cache-aware (default) sends a request to the replica that was sent "
                   "the longest run of its prompt's leading blocks, while that replica's load stays within a quarter "
                   "(at least 2 requests) of the least loaded; least-loaded: the fewest unfinished requests only")


def add_request_handling_args(g: argparse._ArgumentGroup) -> None:
    """How chat answers are read and which adapters a request may name: `serve`'s flags, which `run-batch` takes too."""
    g.add_argument("--chat-template-content-format", choices=["auto", "string", "openai"], default="auto",
                   help="how a chat message's content reaches the template: string (text parts joined), openai (a "
                   "list of {type: text, text} parts), or auto (openai where the template loops over the parts)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat request's own chat_template field (a Jinja template: code the server runs); "
                   "without this flag such requests get a 400")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='chat requests with tools may let the model decide (tool_choice "auto", the default '
                   "then): its answer is parsed for tool calls (--tool-call-parser)")
    g.add_argument("--reasoning-parser", choices=[*REASONING_PARSERS, *REASONING_ALIASES], default=None,
                   help="split a thinking model's chat answers into message.reasoning_content (between <think> "
                   "and </think>) and message.content (what follows), streamed too: qwen3 (thinking when the "
                   "answer opens with <think>), deepseek_r1 (the answer starts inside the reasoning), gpt_oss "
                   "(alias openai_gptoss: gpt-oss's harmony channels, analysis as reasoning, final as content)")
    g.add_argument("--tool-call-parser", choices=list(TOOL_CALL_PARSERS), default="hermes",
                   help="how auto tool calls are read from the answer; hermes, llama3_json, mistral, qwen3_coder and "
                   "pythonic name one parser that reads <tool_call> blocks (JSON, as Qwen2/2.5's templates ask, or "
                   "Qwen3-Coder's <function=...> XML) and answers made of calls alone: JSON objects or lists naming a "
                   "tool, ';' between (Llama 3.1), after <|python_tag|> or [TOOL_CALLS] (Mistral), or a Python list "
                   "of calls (Llama 3.2 / 4's pythonic form)")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters to serve (implies --enable-lora): each NAME=PATH (a PEFT folder) or a JSON "
                   '{"name": ..., "path": ...}; a request whose model is NAME runs with that adapter')


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """All `pagedserve serve` flags: [MODEL] positional, engine flags, server flags."""
    add_engine_args(parser, model_positional=True)
    add_server_args(parser)
    return parser


def serve_config_from_args(args: argparse.Namespace) -> EngineConfig:
    config = config_from_args(
        args, max_queued_requests=args.max_queued_requests, disable_log_stats=args.disable_log_stats,
        data_parallel_size=getattr(args, "data_parallel_size", 1),
    )
    if config.data_parallel_size > 1 and not getattr(args, "engine_process", True):
        raise ValueError("--data-parallel-size runs each replica in its own engine process: it cannot be used with "
                         "--no-engine-process")
    return config


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API (embedded default model when none is given)",
        description="OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics, /version. See docs/server.md.",
    )
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def engine_core_kwargs(config: EngineConfig, args: argparse.Namespace) -> dict:
    """The engine loop's settings (AsyncEngine / EngineCore keyword arguments)."""
    return dict(
        max_queued_requests=config.max_queued_requests,
        log_stats=not config.disable_log_stats,
        log_stats_interval=getattr(args, "log_stats_interval", 5.0),
    )


def enable_stats_logging(config: EngineConfig) -> None:
    import logging

    if not config.disable_log_stats:
        pkg_logger = logging.getLogger("pagedserve")
        if pkg_logger.getEffectiveLevel() > logging.INFO:
            pkg_logger.setLevel(logging.INFO)  # the periodic stats line is INFO


def start_engine_process(config: EngineConfig, args: argparse.Namespace):
    """Spawns the engine process and returns its ProcessBackend without waiting for it to load (with
    --data-parallel-size N: a DataParallelBackend over N such processes)."""
    import functools
    import logging

    from pagedserve.engine import LLMEngine
    from pagedserve.engine_process import ProcessBackend

    enable_stats_logging(config)
    kwargs = engine_core_kwargs(config, args)
    if config.data_parallel_size > 1:
        from pagedserve.data_parallel import DataParallelBackend

        logging.getLogger(__name__).info("starting %d engine processes (data parallelism)", config.data_parallel_size)
        return DataParallelBackend(
            config, lambda cfg: ProcessBackend(functools.partial(LLMEngine, cfg), kwargs, wait=False),
            routing=getattr(args, "data_parallel_routing", "cache-aware"))
    logging.getLogger(__name__).info("starting the engine process")
    return ProcessBackend(functools.partial(LLMEngine, config), kwargs, wait=False)


def cmd_serve(args: argparse.Namespace) -> int:
    config = serve_config_from_args(args)
    # each adapter folder read (a Hub id downloaded) before the engine starts: a bad one fails fast; run_server uses
    # these, not a second reading
    args.lora_requests = lora_requests_from_args(args)
    # The engine process starts first: the server's own imports then overlap its loading.
    backend = start_engine_process(config, args) if args.engine_process else None
    from pagedserve.entrypoints.openai.server import run_server

    return run_server(config, args, backend=backend)


def lora_requests_from_args(args: argparse.Namespace) -> dict:
    """--lora-modules -> {name: LoRARequest} (ids 1, 2, ... in order); each folder (or Hub repo, downloaded now:
    the requests then name its local folder) is read now, so a bad one stops the start-up instead of failing
    requests later."""
    import json

    from pagedserve.lora import LoRARequest, read_adapter, resolve_adapter_path

    out: dict = {}
    for item in getattr(args, "lora_modules", None) or []:
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH or JSON with name and path") from e
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        path = resolve_adapter_path(path, getattr(args, "hf_token", None), getattr(args, "download_dir", None))
        read_adapter(path)
        out[name] = LoRARequest(name, len(out) + 1, path)
    return out
