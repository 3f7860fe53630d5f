#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks on the Qwen2-7B shapes (random bf16 weights).
# Run from the repo root on the GPU machine with .whl and .devcache carried (see docs/benchmarks.md).
#   bash scripts/gpu_check.sh [tests] [probe] [latency] [throughput] [profile] [profile-eager] [profile-b1]
#                             [profile-mixed] [serve] [compare] [silu] [skinny]
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PAGEDSERVE_COMMIT="${PAGEDSERVE_COMMIT:-$(cat .commit 2>/dev/null)}" PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
M=.devcache/qwen2-7b
phases="${*:-tests latency throughput serve}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
run_phase() {
  local phase=$1
  case $phase in
    tests)
      python3 -m pytest tests/kernels tests/gpu tests/executor -q -m "not slow" -p no:cacheprovider -s -ra ;;
    latency)
      python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy \
        --output-json "$OUT/latency.json" 2>&1 | tail -4 ;;
    throughput)
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --output-json "$OUT/throughput.json" 2>&1 | tail -4 ;;
    compare)
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --input-len 100-1024 --output-len 512 --compare-hf --hf-modes generate --hf-batch-sizes 256 \
        --output-json "$OUT/compare.json" 2>&1 | tail -6 ;;
    profile)
      python3 scripts/profile_steps.py --model $M --batch 256 --context 600 2>&1 | grep -v "^\[transformers\]" ;;
    probe)
      python3 scripts/gemm_probe.py ;;
    profile-eager)
      python3 scripts/profile_steps.py --model $M --batch 139 --context 800 --enforce-eager 2>&1 | grep -v "^\[transformers\]" ;;
    profile-b1)
      python3 scripts/profile_steps.py --model $M --batch 1 --context 128 --enforce-eager 2>&1 | grep -v "^\[transformers\]" ;;
    profile-mixed)
      python3 scripts/profile_steps.py --model $M --workload throughput 2>&1 | grep -v "^\[transformers\]" ;;
    serve)
      t0=$(date +%s.%N)
      python3 -m pagedserve.entrypoints.cli serve $M --load-format dummy --port 8011 > "$OUT/serve.log" 2>&1 &
      pid=$!
      for _ in $(seq 1 240); do
        curl -sf localhost:8011/health > /dev/null && break
        sleep 0.25
      done
      python3 -c "import sys; print(f'serve start-up to /health OK: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
        "$t0" "$(date +%s.%N)"
      python3 examples/load_test.py --base-url http://localhost:8011/v1 --max-tokens 128 2>&1 | tail -3
      kill -TERM $pid; wait $pid; echo "serve exit status $?"
      grep -E "captured|KV cache|ready" "$OUT/serve.log" | head -5 ;;
    silu)
      python3 -m pagedserve.executor.kernels.bench_kernels --tune silu ;;
    skinny)
      python3 scripts/bench_skinny_gemm.py ;;
    *) echo "unknown phase $phase" ;;
  esac
}
# Each phase's whole output goes to $OUT/<phase>.log (it comes back as a file); the tail is printed.
for phase in $phases; do
  echo "=== $phase $(date +%T)"
  run_phase "$phase" > "$OUT/$phase.log" 2>&1
  case $phase in
    tests) grep -E "7B shapes|async vs sync|passed|failed|FAILED|rror" "$OUT/tests.log" | tail -25 ;;
    profile*|probe|silu|skinny) grep -v "^\[transformers\]" "$OUT/$phase.log" | tail -n 45 ;;
    *) tail -n 8 "$OUT/$phase.log" ;;
  esac
done
echo "=== done $(date +%T)"
