#!/usr/bin/env bash
# The 11 MB tokenizer.json lives in .devcache/qwen2-7b only (the device tool carries 64 MiB at most);
# scripts/gpu_check.sh copies it into the other folders on the GPU machine.
# Builds .devcache/qwen2-7b: the Qwen2-7B-Instruct config.json (shapes only, for --load-format dummy)
# beside the Qwen ChatML tokenizer files of the embedded default model (the same tokenizer family).
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(python -c 'from pagedserve.default_model import ensure_default_model as f; print(f())')"
mkdir -p .devcache/qwen2-7b
cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/chat_template.jinja .devcache/qwen2-7b/
cp docs/qwen2-7b-config.json .devcache/qwen2-7b/config.json
# .devcache/qwen3-moe: the Qwen3-30B-A3B config (128 experts, top 8; shapes only) beside the same tokenizer files.
mkdir -p .devcache/qwen3-moe
cp .devcache/qwen2-7b/tokenizer_config.json .devcache/qwen2-7b/chat_template.jinja .devcache/qwen3-moe/
cp docs/qwen3-30b-a3b-config.json .devcache/qwen3-moe/config.json
# .devcache/qwen2-7b-awq: the same shapes as a 4-bit AWQ checkpoint declares them (dummy weights stay 4-bit on CUDA).
mkdir -p .devcache/qwen2-7b-awq
cp .devcache/qwen2-7b/tokenizer_config.json .devcache/qwen2-7b/chat_template.jinja .devcache/qwen2-7b-awq/
cp docs/qwen2-7b-awq-config.json .devcache/qwen2-7b-awq/config.json
# .devcache/gpt-oss-20b: gpt-oss-20b's shapes (24 layers, 32 experts, top 4; eos set to the Qwen tokenizer's).
mkdir -p .devcache/gpt-oss-20b
cp .devcache/qwen2-7b/tokenizer_config.json .devcache/qwen2-7b/chat_template.jinja .devcache/gpt-oss-20b/
cp docs/gpt-oss-20b-config.json .devcache/gpt-oss-20b/config.json
# .devcache/qwen2-0.5b: the embedded model's shapes (Qwen2.5-0.5B: 24 layers, hidden 896; config only) as a draft
# model for the 7B target (gpu_check.sh draft-bench).
mkdir -p .devcache/qwen2-0.5b
cp .devcache/qwen2-7b/tokenizer_config.json .devcache/qwen2-0.5b/
cp "$src"/config.json .devcache/qwen2-0.5b/config.json
