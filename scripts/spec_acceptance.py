"""How often n-gram drafts are kept on real text: chat requests whose answers repeat much of their prompt (editing
code, reformatting data, fixing a paragraph) and one that does not (an open question), greedy, through the engine
on a real model (default: the embedded Qwen2.5-Coder-0.5B-Instruct; CPU works). Prints, per lookup setting, the
drafts kept, the tokens a drafted step, and the steps a request took against its tokens.

    python scripts/spec_acceptance.py [--model DIR] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json

CODE = '''def total_price(items, tax):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax
    return total


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
'''

DATA = json.dumps([{"name": "Ada", "city": "London", "born": 1815}, {"name": "Alan", "city": "Wilmslow", "born": 1912},
                   {"name": "Grace", "city": "New York", "born": 1906}, {"name": "Linus", "city": "Helsinki",
                                                                          "born": 1969}], indent=2)

TEXT = ("The quick brown fox jumpd over the lazy dog. It was a sunny day and the fox was verry happy. After the jump, "
        "the fox ran into the forrest, where it met an owl who was sitting on a branch. The owl asked the fox where "
        "it was going, and the fox said it was going home to it's family.")

TASKS = {
    "code edit": f"Add type hints to these Python functions and return the whole file:\n\n{CODE}",
    "code rename": f"Rename the variable `best` to `cheapest_item` in this code and show the full code:\n\n{CODE}",
    "data": f"Convert this JSON to YAML:\n\n{DATA}",
    "typos": f"Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\n{TEXT}",
    "open question": "Explain in a few sentences why the sky is blue.",
}

SETTINGS = {
    "k4 lookup 1-4": {"num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "k4 lookup 2-4": {"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "k4 lookup 5 (vLLM's default)": {"num_speculative_tokens": 4},
    "k8 lookup 2-4": {"num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    from pagedserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results = {}
    reference = None
    for name, setting in SETTINGS.items():
        llm = LLM(args.model, max_model_len=2048, speculative_config={"method": "ngram", **setting})
        rows = {}
        for task, prompt in TASKS.items():
            stats = llm.engine.scheduler.spec_stats
            before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
            out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0].outputs[0]
            drafts, proposed, kept = (a - b for a, b in zip((stats.num_drafts, stats.num_draft_tokens,
                                                              stats.num_accepted_tokens), before))
            tokens = len(out.token_ids)
            steps = tokens - 1 - kept  # decode steps: each gives one token and the drafts it keeps
            rows[task] = {"tokens": tokens, "drafted_steps": drafts, "drafts": proposed, "kept": kept,
                          "acceptance_rate": kept / proposed if proposed else 0.0,
                          "decode_steps": steps, "tokens_per_decode_step": (tokens - 1) / steps}
            if reference is not None:
                assert out.token_ids == reference[task], f"{name}/{task}: the answer differs from the first setting's"
            rows[task]["_ids"] = out.token_ids
            print(f"{name:30s} {task:14s}: {tokens:4d} tokens, {kept:4d} of {proposed:4d} drafts kept "
                  f"({100 * rows[task]['acceptance_rate']:5.1f}%), {rows[task]['tokens_per_decode_step']:.2f} tokens "
                  f"a decode step", flush=True)
        if reference is None:
            reference = {t: r["_ids"] for t, r in rows.items()}
        for r in rows.values():
            del r["_ids"]
        results[name] = rows
        del llm
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
