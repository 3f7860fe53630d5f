"""`pagedserve run-batch -i requests.jsonl -o results.jsonl --model M`: OpenAI's batch file format, offline (as
`vllm run-batch`).

Each input line is one request as OpenAI's Batch API takes it:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

with url /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/score, /v1/rerank or /v1/classify and the body that
endpoint takes. Every request
goes through the server's own handlers (the FastAPI app of `pagedserve serve`, called in-process without a socket),
all of them at once so the engine batches them (--max-concurrency caps how many are in flight). Each output line,
in input order:

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request the endpoint refuses keeps its line: status_code 4xx and the endpoint's error JSON as the body. A line
that is not a request (bad JSON, an unknown url or method, no custom_id, streaming asked) gets status_code 400 and
`error` {"code", "message"} (custom_id null when the line has none). The exit status is 0 when every line was
answered, whatever each answer was; 2 when the input cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from typing import Any

from pagedserve.entrypoints.args import add_engine_args, config_from_args

logger = logging.getLogger(__name__)

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/v1/rerank", "/v1/classify")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run-batch",
        help="run a file of OpenAI batch requests (JSONL) offline and write their results",
        description="Reads OpenAI Batch API request lines (custom_id, method, url, body) and writes one result line "
        "each, as `vllm run-batch` does. See docs/server.md.",
    )
    p.add_argument("-i", "--input-file", required=True,
                   help="the requests, one JSON object a line (a path, an http(s) URL, or - for standard input)")
    p.add_argument("-o", "--output-file", required=True, help="where the results go (a path, or - for standard output)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: all; the engine's scheduler batches them)")
    add_engine_args(p)
    from pagedserve.entrypoints.openai.cli_serve import add_request_handling_args

    add_request_handling_args(p.add_argument_group("requests"))
    p.set_defaults(func=cmd_run_batch)
    return p


def read_lines(source: str) -> list[str]:
    """The input's lines (blank ones dropped); ValueError when it cannot be read."""
    if source == "-":
        text = sys.stdin.read()
    elif source.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(source, follow_redirects=True, timeout=60.0)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise ValueError(f"cannot fetch the batch input {source!r}: {e}") from e
        text = response.text
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the batch input {source!r}: {e.strerror or e}") from e
    return [line for line in text.splitlines() if line.strip()]


def _line_error(custom_id: Any, message: str) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": f"batch-{uuid.uuid4().hex}", "body": None},
            "error": {"code": 400, "message": message}}


def parse_request(line: str) -> tuple[dict | None, dict | None]:
    """(the request, None) or (None, its error line)."""
    try:
        request = json.loads(line)
    except ValueError as e:
        return None, _line_error(None, f"the line is not JSON: {e}")
    if not isinstance(request, dict):
        return None, _line_error(None, "the line must be a JSON object with custom_id, method, url and body")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, _line_error(custom_id if isinstance(custom_id, (int, float)) else None,
                                 "custom_id must be a non-empty string")
    if str(request.get("method", "POST")).upper() != "POST":
        return None, _line_error(custom_id, f"method {request.get('method')!r}: batch requests are POST")
    if request.get("url") not in BATCH_URLS:
        return None, _line_error(custom_id, f"url {request.get('url')!r} is not supported; one of "
                                            f"{', '.join(BATCH_URLS)}")
    if not isinstance(request.get("body"), dict):
        return None, _line_error(custom_id, "body must be a JSON object (the endpoint's request)")
    if request["body"].get("stream"):
        return None, _line_error(custom_id, "stream is not supported in a batch")
    return request, None


async def run_requests(app: Any, lines: list[str], max_concurrency: int | None = None) -> list[dict]:
    """Each line's result line, in order, every request sent to `app` (the server's FastAPI app) in-process."""
    import httpx

    limit = asyncio.Semaphore(max_concurrency or max(1, len(lines)))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://batch", timeout=None) as client:

        async def one(line: str) -> dict:
            request, error = parse_request(line)
            if error is not None:
                return error
            async with limit:
                response = await client.post(request["url"], json=request["body"])
            try:
                body = response.json()
            except ValueError:
                body = {"error": {"message": response.text, "type": "InternalServerError",
                                  "code": response.status_code}}
            request_id = body.get("id") if isinstance(body, dict) and response.status_code == 200 else None
            return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"],
                    "response": {"status_code": response.status_code,
                                 "request_id": request_id or f"batch-{uuid.uuid4().hex}", "body": body},
                    "error": None}

        return list(await asyncio.gather(*(one(line) for line in lines)))


def write_lines(target: str, results: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from pagedserve.async_engine import AsyncEngine
    from pagedserve.engine import LLMEngine
    from pagedserve.entrypoints.openai.cli_serve import lora_requests_from_args
    from pagedserve.entrypoints.openai.server import ServerSettings, build_app

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    lines = read_lines(args.input_file)  # before the model loads: a missing file fails fast
    lora_modules = lora_requests_from_args(args)
    config = config_from_args(args, disable_log_stats=True)
    t0 = time.monotonic()
    engine = AsyncEngine(LLMEngine(config), log_stats=False)
    settings = ServerSettings(enable_auto_tool_choice=args.enable_auto_tool_choice,
                              trust_request_chat_template=args.trust_request_chat_template,
                              chat_template_content_format=args.chat_template_content_format,
                              reasoning_parser=args.reasoning_parser, lora_modules=lora_modules,
                              model_root=getattr(engine.engine_config, "model", None))
    app = build_app(engine, settings)
    t1 = time.monotonic()
    results = asyncio.run(run_requests(app, lines, args.max_concurrency))
    write_lines(args.output_file, results)
    failed = sum(r["response"]["status_code"] != 200 for r in results)
    print(f"run-batch: {len(results)} requests, {len(results) - failed} answered 200, {failed} refused, in "
          f"{time.monotonic() - t1:.1f} s (model loaded in {t1 - t0:.1f} s)", file=sys.stderr)
    return 0


__all__ = ["BATCH_URLS", "cmd_run_batch", "parse_request", "read_lines", "register", "run_requests"]
