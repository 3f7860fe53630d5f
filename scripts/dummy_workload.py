"""What the GPU cost scripts share (structured_cost.py, structured_profile.py, prompt_logprobs_cost.py): the
model folder given as --model loaded with random weights, and a fixed set of --requests prompts of --input-len
token ids (the same ids on every run and machine)."""

from __future__ import annotations

import argparse

from pagedserve import LLM


def workload_parser(requests: int, input_len: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--input-len", type=int, default=input_len)
    return ap


def load_workload(args: argparse.Namespace) -> tuple[LLM, list[dict]]:
    llm = LLM(args.model, load_format="dummy", max_model_len=2048)
    prompts = [{"prompt_token_ids": [(i * 7919 + j * 104729) % 150000 + 100 for j in range(args.input_len)]}
               for i in range(args.requests)]
    return llm, prompts
