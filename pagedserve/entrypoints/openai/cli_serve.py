"""`pagedserve serve`: registered into the CLI's subcommands by pagedserve.entrypoints.cli."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from pagedserve.entrypoints.openai.server import add_serve_args

    p = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API (embedded default model when none is given)",
        description="OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics, /version. See docs/server.md.",
    )
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.openai.server import run_server, serve_config_from_args

    return run_server(serve_config_from_args(args), args)
