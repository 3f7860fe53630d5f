"""`pagedserve` command line: generate | chat | serve | bench."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedserve.entrypoints.args import add_engine_args, config_from_args, parse_args_with_config


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")


def _sampling_params(args: argparse.Namespace):
    from pagedserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.llm import LLM

    llm = LLM(**_config_kwargs(args))
    params = _sampling_params(args)
    if args.raw:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text, flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.llm import LLM

    llm = LLM(**_config_kwargs(args))
    params = _sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("pagedserve chat: type a message; /clear forgets the conversation, /exit or Ctrl-D quits.", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        except ValueError as e:
            print(f"error: {e}", flush=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def _config_kwargs(args: argparse.Namespace) -> dict:
    import dataclasses

    config = config_from_args(args)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="A PagedAttention LLM serving engine.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (INFO shows engine stats)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate replies to prompts (chat template applied unless --raw)")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--raw", action="store_true", help="complete the prompt text as is, no chat template")
    add_engine_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """serve, run-batch and bench live in their own modules; they register their subparsers here."""
    from pagedserve.bench.cli_bench import register as register_bench
    from pagedserve.entrypoints.openai.cli_serve import register as register_serve
    from pagedserve.entrypoints.openai.run_batch import register as register_run_batch

    register_serve(sub)
    register_run_batch(sub)
    register_bench(sub)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args_with_config(build_parser(), argv)
    except ValueError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
