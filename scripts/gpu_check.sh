#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks on the Qwen2-7B shapes (random bf16 weights).
# Run from the repo root on the GPU machine with .whl and .devcache carried (see docs/benchmarks.md).
#   bash scripts/gpu_check.sh [tests] [probe] [latency] [throughput] [profile] [profile-eager] [profile-b1]
#                             [profile-mixed] [serve] [compare] [silu] [skinny] [serve-bench]
set -uo pipefail
# Phases write their logs and JSON under a local folder, packed after each phase into ONE file in the
# device tool's $OUT (it returns at most 8 files: a call of several phases lost its later logs that way).
RETURN_DIR="${OUT:-/tmp/out}"; OUT=/tmp/gpu-check-out; mkdir -p "$RETURN_DIR" "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PAGEDSERVE_COMMIT="${PAGEDSERVE_COMMIT:-$(cat .commit 2>/dev/null)}" PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
M=.devcache/qwen2-7b
for d in .devcache/*/; do  # the dummy folders share qwen2-7b's tokenizer (carried once: make_7b_config.sh)
  [ -f "$d/tokenizer.json" ] || cp "$M/tokenizer.json" "$d" 2>/dev/null || true
done
phases="${*:-tests latency throughput serve}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
start_server() {  # start_server PORT [extra serve flags...]: background server, waits for /health
  local port=$1; shift
  local t0; t0=$(date +%s.%N)
  python3 -m pagedserve.entrypoints.cli serve $M --load-format dummy --port "$port" --disable-access-log "$@" \
    > "$OUT/server-$port.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 480); do
    curl -sf "localhost:$port/health" > /dev/null && break
    sleep 0.25
  done
  python3 -c "import sys; print(f'serve start-up to /health OK: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" \
    "$t0" "$(date +%s.%N)"
}
stop_server() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID"; echo "serve exit status $?"; }
bench_serve() {  # bench_serve PORT NAME [bench serve flags...]
  local port=$1 name=$2; shift 2
  python3 -m pagedserve.entrypoints.cli bench serve --base-url "http://localhost:$port" --disable-tqdm \
    --output-json "$OUT/$name.json" "$@" 2>&1 | grep -vE "^\[transformers\]|HTTP Request"
}
run_phase() {
  local phase=$1
  case $phase in
    tests)
      python3 -m pytest tests/kernels tests/gpu tests/executor -q -m "not slow" -p no:cacheprovider -s -ra \
        --ignore=tests/kernels/test_sample.py ;;
    structured)  # structured outputs on the CUDA sampler paths, then their cost on the 7B shapes
      timeout 300 python3 -m pytest tests/gpu/test_structured_gpu.py -x -q -p no:cacheprovider -ra 2>&1 | tail -15
      timeout 400 python3 scripts/structured_cost.py --model $M 2>&1 | grep -vE "^\[transformers\]|Warning" | tail -12 ;;
    prompt-logprobs)  # prompt logprobs with graphs and async on, then their cost on lm-eval's loglikelihood workload
      timeout 300 python3 -m pytest tests/gpu/test_prompt_logprobs_gpu.py tests/kernels/test_logprob_stats.py -x -q \
        -p no:cacheprovider -ra -s 2>&1 | tail -8
      timeout 300 python3 scripts/prompt_logprobs_cost.py --model $M 2>&1 | grep -vE "^\[transformers\]|Warning" | tail -24 ;;
    logprob-kernel)  # the fused logprob statistics alone against torch's passes, one LM-head slice
      timeout 120 python3 scripts/prompt_logprobs_cost.py --model $M --kernel-only 2>&1 | grep -E "^logprob_stats" ;;
    qwen3-test)  # Qwen3 (q/k norms) through the engine with graphs and async vs Transformers; the mixed batch on CUDA
      timeout 300 python3 -m pytest tests/gpu/test_qwen3_gpu.py tests/executor/test_model_runner.py -k "gpu or cuda" \
        -q -s -p no:cacheprovider -ra 2>&1 | grep -E "qwen3:|passed|failed|FAILED|rror" | tail -12 ;;
    structured-profile)  # an all-constrained batch against a plain one under torch.profiler
      timeout 400 python3 scripts/structured_profile.py --model $M 2>&1 | grep -vE "^\[transformers\]|Warning" | tail -70 ;;
    structured-cost)  # the cost alone, with each run's step timing (host vs device)
      timeout 400 python3 scripts/structured_cost.py --model $M 2>&1 | grep -vE "^\[transformers\]|Warning" | tail -12 ;;
    structured-cprofile)  # the host's functions by own time (cProfile), plain vs all constrained
      timeout 400 python3 scripts/structured_cost.py --model $M --cprofile 2>&1 | grep -vE "^\[transformers\]|Warning" \
        | tail -64 ;;
    sample-test)  # the fused sampling kernel (off by default until this passes)
      timeout ${SAMPLE_TEST_S:-280} python3 -m pytest tests/kernels/test_sample.py -x -q -p no:cacheprovider 2>&1 | tail -60 ;;
    latency)
      python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy \
        --output-json "$OUT/latency.json" 2>&1 | tail -4 ;;
    tp-test)  # tensor parallelism on two GPUs (NCCL): the tiny checkpoints against Transformers, then the CPU cases
      timeout 400 python3 -m pytest tests/executor/test_tensor_parallel.py -x -q -p no:cacheprovider 2>&1 | tail -8 ;;
    tp-bench)  # the 7B shapes over two GPUs (eager steps): batch-1 latency and the default workload
      python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy --tensor-parallel-size 2 \
        2>&1 | tail -4
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --tensor-parallel-size 2 2>&1 | grep -E "^throughput|^steps|^floor|Error|error" ;;
    latency-cublas)  # A/B: batch-1 projections through cuBLAS instead of the Triton skinny GEMM
      PAGEDSERVE_NO_SKINNY_GEMM=1 python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy \
        --output-json "$OUT/latency-cublas.json" 2>&1 | tail -4 ;;
    throughput)
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --output-json "$OUT/throughput.json" 2>&1 | tail -4 ;;
    compare)  # issue 5 item 1, both sides greedy (TEMP=1 for both sampling at temperature 1)
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --input-len 100-1024 --output-len 512 --compare-hf --hf-modes generate --hf-batch-sizes 256 \
        --temperature "${TEMP:-0}" \
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
      start_server 8011
      python3 examples/load_test.py --base-url http://localhost:8011/v1 --max-tokens 128 2>&1 | tail -5
      sleep 6  # the stats line (with the engine's step timing) of the first load test alone
      python3 examples/load_test.py --base-url http://localhost:8011/v1 --max-tokens 128 2>&1 | tail -4
      stop_server
      grep -E "captured|KV cache|ready|started|tokenizer|serving|imports|step timing|frozen" "$OUT/server-8011.log" \
        | head -16 ;;
    serve-ab)  # the load test against a server without mixed-step CUDA graphs (A/B with the serve phase)
      export PAGEDSERVE_MIXED_GRAPHS=0
      start_server 8017
      python3 examples/load_test.py --base-url http://localhost:8017/v1 --max-tokens 128 2>&1 | tail -2
      sleep 6
      python3 examples/load_test.py --base-url http://localhost:8017/v1 --max-tokens 128 2>&1 | tail -2
      stop_server
      unset PAGEDSERVE_MIXED_GRAPHS
      grep -E "captured|ready|step timing" "$OUT/server-8017.log" | head -8 ;;
    launch-probe)  # host cost of eager launches: cuBLAS at new vs seen token counts, Triton launches
      python3 scripts/launch_probe.py ;;
    prof-load)  # the load test against a server whose engine step loop runs under cProfile
      PAGEDSERVE_ENGINE_PROFILE=/tmp/engine-prof-load.txt start_server 8016
      python3 examples/load_test.py --base-url http://localhost:8016/v1 --max-tokens 128 2>&1 | tail -2
      python3 examples/load_test.py --base-url http://localhost:8016/v1 --max-tokens 128 2>&1 | tail -2
      sleep 5
      stop_server
      grep -E "step timing" "$OUT/server-8016.log" | tail -2
      cp /tmp/engine-prof-load.txt "$OUT/" 2>/dev/null
      head -c 7000 /tmp/engine-prof-load.txt ;;
    serve-bench)
      # Issue 5: items 2 and 3 (serve-bench-lite), then serving latency at concurrency 1/16/64/256.
      run_phase serve-bench-lite
      run_phase serve-conc ;;
    serve-conc)  # serving latency at concurrency 1/16/64/256 only (JSON and plots in the logs' tarball)
      start_server 8012
      for c in 1 16 64 256; do
        echo "-- concurrency $c"
        bench_serve 8012 "serve-c$c" --num-prompts $(( c == 1 ? 8 : 2 * c )) --input-len 1024 --output-len 128 \
          --max-concurrency $c --plot "$OUT/serve-c$c.png" | grep -E "Output token throughput|TTFT|TPOT|E2E"
      done
      stop_server ;;
    serve-paths)  # one request down each sampling path (n > 1, filters, penalties, logprobs, ...): compiles left?
      start_server 8018
      python3 scripts/serve_paths.py --base-url http://localhost:8018/v1 2>&1 | grep -v "HTTP Request"
      stop_server
      grep -E "while serving" "$OUT/server-8018.log" | cut -c1-600 ;;
    serve-compiles)  # Triton compiles while serving (warnings in the engine's log) under concurrency 1 / 16 / 64
      PAGEDSERVE_ENGINE_PROFILE=/tmp/engine-prof-c.txt start_server 8017
      for c in 1 16 64; do
        echo "-- concurrency $c"
        bench_serve 8017 "serve-compiles-c$c" --num-prompts $(( c == 1 ? 4 : 2 * c )) --input-len 1024 \
          --output-len 128 --max-concurrency $c | grep -E "Median TTFT|P99 TTFT|Median TPOT"
      done
      stop_server
      grep -E "while serving|step timing|warm-up|cuBLAS warmed" "$OUT/server-8017.log" | cut -c1-1600
      cp /tmp/engine-prof-c.txt "$OUT/" 2>/dev/null
      sed -n '1,45p' /tmp/engine-prof-c.txt | cut -c1-160 ;;
    serve-bench-lite)  # issue 5 items 2 and 3 only, key lines printed
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --input-len 100-1024 --output-len 512 --output-json "$OUT/tp-compare-workload.json" 2>&1 | grep "^throughput"
      start_server 8012
      bench_serve 8012 serve-compare-workload --num-prompts 256 --input-len 100-1024 --output-len 512 \
        | grep -E "Output token throughput|Median TTFT|Median TPOT"
      bench_serve 8012 serve-shared-prefix-cached --dataset shared-prefix --output-len 64 | grep -E "Output token|TTFT"
      stop_server
      start_server 8013 --no-enable-prefix-caching
      bench_serve 8013 serve-shared-prefix-uncached --dataset shared-prefix --output-len 64 | grep -E "Output token|TTFT"
      stop_server ;;
    serve-diag)  # the comparison workload offline, then through the server (engine step timing in its log)
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --input-len 100-1024 --output-len 512 2>&1 | grep -E "^throughput|^steps"
      start_server 8014
      bench_serve 8014 serve-diag --num-prompts 256 --input-len 100-1024 --output-len 512 \
        | grep -E "Output token throughput|Median TTFT|Median TPOT" &
      local bench=$!
      sleep 7
      local engine_pid; engine_pid=$(pgrep -P "$SERVER_PID" -f spawn_main | head -1)
      local spy=/tmp/site/bin/py-spy
      $spy record -p "$SERVER_PID" -d 6 -r 200 --nonblocking -f raw -o /tmp/spy-api.txt > /dev/null 2>&1 &
      $spy record -p "$engine_pid" -d 6 -r 200 --nonblocking -f raw -o /tmp/spy-engine.txt > /dev/null 2>&1
      wait $bench
      sleep 1
      python3 scripts/pyspy_top.py /tmp/spy-api.txt --top 30
      python3 scripts/pyspy_top.py /tmp/spy-engine.txt --top 30
      stop_server
      grep -E "step timing|generation:" "$OUT/server-8014.log" | tail -6 ;;
    decode-mix)
      python3 -m pagedserve.executor.kernels.bench_kernels --tune decode-mix ;;
    check7b)  # the 7B-shapes logits check (rel err, top-1, margins of the flips) and the memory-profile test
      python3 -m pytest tests/gpu/test_qwen2_7b_shapes.py -q -s -p no:cacheprovider > /tmp/check7b.txt 2>&1
      cp /tmp/check7b.txt "$OUT/check7b-pytest.txt"  # the whole pytest output travels in gpu-logs.tgz
      grep -E "^7B shapes|^E  |passed|failed" /tmp/check7b.txt | tail -12  # figures, not the traceback's source lines
      python3 -m pytest tests/executor -q -p no:cacheprovider -k cuda_memory_profile 2>&1 | tail -5 ;;
    serve-prof)  # the serve-diag workload with the engine's step loop under cProfile (slower; for the breakdown)
      PAGEDSERVE_ENGINE_PROFILE=/tmp/engine-prof.txt start_server 8015
      bench_serve 8015 serve-prof --num-prompts 256 --input-len 100-1024 --output-len 512 \
        | grep -E "Output token throughput|Median TPOT"
      stop_server
      grep -E "step timing" "$OUT/server-8015.log" | tail -2
      head -c 9000 /tmp/engine-prof.txt ;;
    importprobe)  # which transformers imports are cheap on this machine (torch imported first, as in the engine)
      for stmt in "from transformers import AutoConfig, AutoTokenizer" \
          "from transformers.models.auto.configuration_auto import AutoConfig" \
          "from transformers.models.auto.tokenization_auto import AutoTokenizer" \
          "from transformers import PretrainedConfig" \
          "from transformers import Qwen2Config" \
          "from transformers import PreTrainedTokenizerFast" \
          "from transformers import Qwen2Tokenizer" \
          "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; CONFIG_MAPPING['qwen2']"; do
        python3 -c "import sys, time, torch; t = time.perf_counter(); exec(sys.argv[1]); \
n = sum(m.startswith(('sklearn', 'sympy', 'torch._dynamo', 'transformers.models.auto.auto_factory')) for m in sys.modules); \
print(f'{time.perf_counter() - t:6.2f} s  heavy modules {n:4d}  {sys.argv[1]}')" "$stmt"
      done ;;
    silu)
      python3 -m pagedserve.executor.kernels.bench_kernels --tune silu ;;
    importtime)  # where the start-up's import seconds go on this machine
      for mod in torch "transformers" "transformers:AutoConfig,AutoTokenizer" pagedserve.executor.loader \
          fastapi pagedserve.entrypoints.cli pagedserve.entrypoints.openai.server; do
        python3 -c "
import sys, time
mod, _, names = sys.argv[1].partition(':')
t = time.perf_counter()
m = __import__(mod, fromlist=names.split(',') if names else [])
for n in filter(None, names.split(',')): getattr(m, n)
print(f'{sys.argv[1]:45s} {time.perf_counter() - t:6.2f} s')" "$mod"
      done
      python3 -X importtime -c "from transformers import AutoConfig, AutoTokenizer" 2> "$OUT/importtime-transformers.txt"
      # Are the packages' .pyc files cached? (A read-only site-packages recompiles on every start.)
      local tdir; tdir=$(python3 -c "import os, transformers; print(os.path.dirname(transformers.__file__))")
      echo "transformers at $tdir; writable: $([ -w "$tdir" ] && echo yes || echo no);" \
        "pyc files: $(find "$tdir" -name '*.pyc' | wc -l), py files: $(find "$tdir" -name '*.py' | wc -l);" \
        "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}; sys.flags.dont_write_bytecode:" \
        "$(python3 -c 'import sys; print(sys.flags.dont_write_bytecode)')"
      for i in 1 2; do
        python3 -c "import time; t = time.perf_counter(); from transformers import AutoConfig, AutoTokenizer; \
print(f'import again ($i): {time.perf_counter() - t:.2f} s')"
      done
      for i in 1 2; do
        PYTHONPYCACHEPREFIX=/tmp/pyc python3 -c "import time; t = time.perf_counter(); \
from transformers import AutoConfig, AutoTokenizer; print(f'with PYTHONPYCACHEPREFIX ($i): {time.perf_counter() - t:.2f} s')"
      done ;;
    tp-ab)  # default workload: decode order off / on / on + fused sampler, one line each
      for v in "PAGEDSERVE_DECODE_ORDER=0" "PAGEDSERVE_DECODE_ORDER=1" "PAGEDSERVE_DECODE_ORDER=1 PAGEDSERVE_FUSED_SAMPLER=1"; do
        echo "-- $v"
        env $v python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
          2>&1 | grep -E "^throughput|^steps|^floor"
      done ;;
    lat-ab)  # batch-1 decode: PDL off/on (LAT_AB overrides the list of env settings, ";"-separated)
      local v
      while IFS= read -r -d ";" v || [ -n "$v" ]; do
        echo "-- $v"
        env $v python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy 2>&1 \
          | grep -E "^latency|graph replay|^floor"
      done <<< "${LAT_AB:-PAGEDSERVE_PDL=0;PAGEDSERVE_PDL=1}" ;;
    steplog)  # the default workload with one log line per mixed step (launch vs wait vs device)
      PAGEDSERVE_LOG_STEPS=1 PAGEDSERVE_LOG_COMPILES=1 python3 -m pagedserve.entrypoints.cli --log-level info bench throughput --model $M \
        --load-format dummy --no-tqdm 2>&1 | grep -E "mixed step|^throughput|^steps" | sed 's/^.*INFO pagedserve.engine: //' ;;
    skinny-test-entries)  # every SKINNY_CONFIGS entry at its 7B shape, and the model-shape tests
      timeout 200 python3 -m pytest tests/kernels/test_skinny_gemm.py -k "every_measured or model_shapes" -x -q \
        -p no:cacheprovider 2>&1 | tail -8 ;;
    small-ab)  # decode at small batches (SMALL_N prompts of 512 in / 512 out): skinny entries off / on
      local n v
      for n in ${SMALL_N:-32 24 8}; do
        for v in PAGEDSERVE_SKINNY_SMALL_BATCH=0 PAGEDSERVE_SKINNY_SMALL_BATCH=1; do
          echo "-- $n prompts, $v"
          env $v python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
            --num-prompts "$n" --input-len 512 --output-len 512 2>&1 | grep -E "^throughput|^steps|Error|error"
        done
      done ;;
    tput-ab)  # the default workload under each env setting (TPUT_AB, ";"-separated)
      local v
      while IFS= read -r -d ";" v || [ -n "$v" ]; do
        echo "-- $v"
        env $v python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm 2>&1 \
          | grep -E "^throughput|^steps|^gc:|^floor|Error|error"
      done <<< "${TPUT_AB:-PAGEDSERVE_FUSED_SAMPLER=0;PAGEDSERVE_FUSED_SAMPLER=1}" ;;
    filter-test)  # the top-k / top-p / min-p threshold kernel and the sampling kernel with thresholds
      timeout -s INT 150 python3 -m pytest tests/kernels/test_sample_filter.py -x -v -p no:cacheprovider --durations=5 2>&1 \
        | grep -E "PASS|FAIL|SKIP|Error|error|passed|failed|sample_filter.py:[0-9]+|s call" | tail -45
      timeout -s INT 150 python3 -m pytest tests/kernels/test_sample.py -x -q -p no:cacheprovider --durations=5 -k "not full_vocabulary" 2>&1 | tail -9
      timeout -s INT 60 python3 -m pytest tests/kernels/test_sample.py -x -v -p no:cacheprovider -k full_vocabulary 2>&1 | tail -25 ;;
    sample-filter)  # filtered sampling: torch path vs threshold kernel + fused sampler, S = 1 / 64 / 256
      timeout "${SF_TIMEOUT:-400}" python3 -m pagedserve.executor.kernels.bench_kernels --tune sample-filter ;;
    tput-filter)  # the default workload at T 0.7: plain; top-p 0.9 on the torch path; top-p 0.9 and top-k 50 fused
      local v
      for v in "PAGEDSERVE_FUSED_FILTERS=1|" "PAGEDSERVE_FUSED_FILTERS=0|--top-p 0.9" "PAGEDSERVE_FUSED_FILTERS=1|--top-p 0.9" \
               "PAGEDSERVE_FUSED_FILTERS=1|--top-k 50 --top-p 0.95"; do
        echo "-- ${v%%|*} --temperature 0.7 ${v#*|}"
        env ${v%%|*} python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
          --temperature 0.7 ${v#*|} 2>&1 | grep -E "^throughput|^steps|^floor|Error|error"
      done ;;
    pen-test)  # penalties: the kernel, the sampler's history (CUDA params), async == sync with penalties
      timeout -s INT 200 python3 -m pytest tests/kernels/test_penalties.py tests/executor/test_sampler.py -x -q \
        -p no:cacheprovider --durations=3 2>&1 | tail -12
      timeout -s INT 240 python3 -m pytest tests/test_async_scheduling.py -x -q -p no:cacheprovider 2>&1 | tail -8 ;;
    filter-warps)  # the threshold kernel's warps a program and tile (programs an SM from its registers)
      local w t
      for wt in "1 256" "2 256" "4 256" "4 512"; do
        read -r w t <<< "$wt"
        echo "-- PAGEDSERVE_FILTER_WARPS=$w PAGEDSERVE_FILTER_TILE=$t"
        PAGEDSERVE_FILTER_WARPS=$w PAGEDSERVE_FILTER_TILE=$t timeout 200 python3 -m pagedserve.executor.kernels.bench_kernels \
          --tune sample-filter 2>&1 | grep -E " (1|256) |threshold kernel|Error|error"
      done ;;
    filter-diag)  # the threshold kernel case by case (subprocesses with timeouts), then sample-filter timings
      OUT="$OUT" bash scripts/filter_diag.sh ;;
    tput-chat)  # default workload at T 0.7: plain; top-p 0.8 + top-k 20; + repetition 1.05 (Qwen2-7B-Instruct's defaults)
      local q
      for q in "" "--top-p 0.8 --top-k 20" "--top-p 0.8 --top-k 20 --repetition-penalty 1.05"; do
        echo "-- --temperature 0.7 $q"
        python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
          --temperature 0.7 $q 2>&1 | grep -E "^throughput|^steps|^floor|Error|error"
      done ;;
    tput-pen)  # default workload at T 0.7: Qwen2-7B-Instruct's recommended sampling (top-p 0.8, top-k 20, rep 1.05)
      local v q="--top-p 0.8 --top-k 20 --repetition-penalty 1.05"
      for v in "PAGEDSERVE_FUSED_PENALTIES=1|" "PAGEDSERVE_FUSED_PENALTIES=1|--top-p 0.8 --top-k 20" \
               "PAGEDSERVE_PENALTY_SYNC=1 PAGEDSERVE_FUSED_PENALTIES=0|$q" "PAGEDSERVE_FUSED_PENALTIES=0|$q" \
               "PAGEDSERVE_FUSED_PENALTIES=1|$q"; do
        echo "-- ${v%%|*} --temperature 0.7 ${v#*|}"
        env ${v%%|*} python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
          --temperature 0.7 ${v#*|} 2>&1 | grep -E "^throughput|^steps|^floor|Error|error"
      done ;;
    sample-quick)  # the sampling kernel's greedy and Sampler tests, and its full-vocabulary ones
      timeout 240 python3 -m pytest tests/kernels/test_sample.py -x -q -p no:cacheprovider \
        -k "argmax or sampler or capturable or full_vocabulary or layout" 2>&1 | tail -8 ;;
    kernels-test)  # the attention/KV/norm kernels' test file on the GPU
      timeout 400 python3 -m pytest tests/kernels/test_kernels.py tests/kernels/test_fused_ops.py tests/kernels/test_silu_mul.py \
        tests/kernels/test_gate_up_silu.py \
        -q -p no:cacheprovider -x 2>&1 | tail -40 ;;
    fp32-test)  # the GPU-only test that the fp32 attention dots are full precision (TF32 would fail it)
      timeout 150 python3 -m pytest tests/kernels/test_kernels.py -k fp32_attention_is_full_precision \
        -q -p no:cacheprovider 2>&1 | tail -6 ;;
    b1-test)  # the batch-1 fused kernels (qkv + rotary + KV write; gate_up + SiLU·mul) and their decoder tests
      timeout 300 python3 -m pytest tests/kernels/test_qkv_rope_kv.py tests/kernels/test_gate_up_silu.py -q \
        -p no:cacheprovider 2>&1 | grep -vE "^Writing|^\s*$" | tail -40 ;;
    sustained)  # the bf16 matrix rate held for seconds vs the burst ceiling; the mixed step's GEMM sequence
      timeout 120 python3 scripts/sustained_rate.py ;;
    gemm-layouts)  # cuBLAS with the weight [N, K] vs [K, N] at a decode batch and prefill chunk sizes
      timeout 200 python3 scripts/gemm_layouts.py ;;
    grouped-mm)  # torch's CUTLASS GEMM (torch._grouped_mm) vs cuBLAS at the decode batches, both orientations
      timeout 150 python3 scripts/grouped_mm_probe.py ${GMM_ARGS:-} 2>&1 | grep -E "grouped-mm|rror" ;;
    qkv-test)  # the batch-1 qkv GEMV with rotary + KV write (kernels/qkv_rope_kv.py) on the GPU; then A/B it with
      # LAT_AB="PAGEDSERVE_FUSED_QKV_ROPE=0;PAGEDSERVE_FUSED_QKV_ROPE=1;PAGEDSERVE_FUSED_QKV_ROPE=0;PAGEDSERVE_FUSED_QKV_ROPE=1"
      timeout 200 python3 -m pytest tests/kernels/test_qkv_rope_kv.py -q -p no:cacheprovider -x 2>&1 | tail -6 ;;
    mixed-test)  # the mixed-step CUDA graphs vs HF, and async vs sync steps (graphs of both kinds); KV offloading
      timeout 300 python3 -m pytest tests/kernels/test_runner_mixed_graph.py tests/gpu/test_async_gpu.py \
        tests/gpu/test_kv_offloading_gpu.py -q -s -p no:cacheprovider -x 2>&1 | grep -E "passed|failed|Error|offload" \
        | tail -6 ;;
    embed-test)  # embeddings with graphs and async on vs Transformers, then the async / prompt-logprob GPU tests
      timeout 400 python3 -m pytest tests/gpu/test_embeddings_gpu.py tests/gpu/test_async_gpu.py \
        tests/gpu/test_prompt_logprobs_gpu.py tests/gpu/test_classify_gpu.py -q -s -p no:cacheprovider -ra 2>&1 \
        | grep -E "passed|failed|^FAILED|Error|worst" | tail -12 ;;
    lora-test)  # LoRA adapters with graphs and async on vs Transformers with the adapters merged
      timeout 300 python3 -m pytest tests/gpu/test_lora_gpu.py tests/kernels/test_lora_sgmv.py \
        tests/kernels/test_runner_lora.py -q -s -p no:cacheprovider -ra 2>&1 \
        | grep -E "passed|failed|^FAILED|Error|lora " | tail -12 ;;
    sleep-test)  # sleep mode on the GPU: memory back to the driver, graphs recaptured, same tokens after waking
      timeout 300 python3 -m pytest tests/gpu/test_sleep_gpu.py tests/test_sleep_mode.py -q -s -p no:cacheprovider \
        -ra 2>&1 | grep -E "passed|failed|^FAILED|Error|sleep level|worst" | tail -12 ;;
    spec-test)  # speculative decoding (n-gram drafts) with graphs on vs Transformers: fp32 and bf16 at batch 1
      timeout 300 python3 -m pytest tests/gpu/test_spec_decode_gpu.py -q -s -p no:cacheprovider -ra 2>&1 \
        | grep -E "passed|failed|^FAILED|Error|spec " | tail -12 ;;
    spec-bench)  # what n-gram drafts buy: batch-1 latency with k = 0, 2, 4, 8 drafts; the default workload greedy with and
      # without drafts, and at temperature 1 with drafts (the random model's sampled answers give nothing to draft from)
      for k in ${SPEC_LAT_KS:-0 2 4 8}; do
        echo "== batch 1, num_speculative_tokens $k"
        spec=(); [ "$k" != 0 ] && spec=(--speculative-config "{\"method\": \"ngram\", \"num_speculative_tokens\": $k, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1}")
        python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy "${spec[@]}" \
          --output-json "$OUT/latency-spec-$k.json" 2>&1 | grep -E "latency:|steps:|speculative" | cut -c1-400
      done
      s4='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
      for run in ${SPEC_TP_RUNS:-0,none 0,spec 1,spec}; do
        run=${run/,/ }
        set -- $run
        echo "== default workload, temperature $1, drafts: $2"
        spec=(); [ "$2" = spec ] && spec=(--speculative-config "$s4")
        python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm --temperature $1 \
          "${spec[@]}" --output-json "$OUT/throughput-spec-$1-$2.json" 2>&1 \
          | grep -E "throughput:|steps:|floor|speculative" | cut -c1-600
      done ;;
    draft-bench)  # a draft model's cost (7B target, a dummy Qwen2-0.5B-shaped draft: random, so ~nothing is kept):
      # batch-1 latency with k = 0 and 4, then with the 7B as its own draft (every draft kept: the best case's step
      # count, at the cost of four 7B draft steps a step)
      for run in ${DRAFT_RUNS:-none qwen05 self}; do
        echo "== batch 1, draft: $run"
        spec=()
        [ "$run" = qwen05 ] && spec=(--speculative-config '{"method": "draft_model", "model": ".devcache/qwen2-0.5b", "num_speculative_tokens": 4}')
        [ "$run" = self ] && spec=(--speculative-config "{\"method\": \"draft_model\", \"model\": \"$M\", \"num_speculative_tokens\": 4}")
        python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy "${spec[@]}" \
          --output-json "$OUT/latency-draft-$run.json" 2>&1 | grep -E "latency:|steps:|speculative|Error" | cut -c1-400
      done ;;
    spec-cost)  # a drafted step's time at batch 1 / 16 / 64 with k = 2, 4, 8 forced drafts vs no drafts (7B shapes)
      python3 scripts/spec_step_cost.py $M --load-format dummy --batches "${SPEC_BATCHES:-1,16,64}" \
        --ks "${SPEC_KS:-0,2,4,8}" ${SPEC_ONE:+--one-drafting} --output-json "$OUT/spec-cost.json" 2>&1 | grep -vE "^\[transformers\]|Warning" | cut -c1-800 ;;
    lora-bench)  # what LoRA adapters cost: batch-1 latency and the default workload, without / with random adapters
      # (LORA_AB=1: with adapters once through the Triton kernels and once through the torch path)
      # (LORA_RUNS="loras,kernels,max_tokens ...": e.g. "4,1,64" = kernels up to 64 tokens a forward, torch above)
      runs="0,1,- ${LORA_K:-4},1,-"; [ -n "${LORA_AB:-}" ] && runs="$runs ${LORA_K:-4},0,-"
      for run in ${LORA_RUNS:-$runs}; do
        IFS=, read -r l kern maxtok <<< "$run"
        [ "$maxtok" = - ] && maxtok=1000000
        echo "== --num-loras $l, PAGEDSERVE_LORA_KERNELS=$kern, PAGEDSERVE_LORA_KERNEL_MAX_TOKENS=$maxtok"
        export PAGEDSERVE_LORA_KERNELS=$kern PAGEDSERVE_LORA_KERNEL_MAX_TOKENS=$maxtok
        python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy \
          --num-loras $l 2>&1 | grep -E "latency:|steps:" | cut -c1-400
        python3 -m pagedserve.entrypoints.cli bench throughput --model $M \
          --load-format dummy --no-tqdm --num-loras $l --output-json "$OUT/throughput-lora-$l-$kern-$maxtok.json" 2>&1 \
          | grep -E "throughput:|steps:|floor" | cut -c1-600
        unset PAGEDSERVE_LORA_KERNELS PAGEDSERVE_LORA_KERNEL_MAX_TOKENS
      done ;;
    moe-test)  # MoE: the grouped-GEMM kernels against torch, then small MoE models through the engine vs Transformers
      timeout 400 python3 -m pytest tests/kernels/test_fused_moe.py tests/gpu/test_moe_gpu.py tests/executor/test_moe.py \
        -q -s -p no:cacheprovider -ra 2>&1 | grep -E "moe:|passed|failed|FAILED|rror" | tail -20 ;;
    gptoss-test)  # gpt-oss: the sinks in both attention kernels and the experts' biases + gate compiled, then the runner
      # (mixed steps, Triton and torch backends) and the engine against Transformers
      timeout 420 python3 -m pytest tests/kernels/test_attention_sinks.py tests/kernels/test_fused_moe.py \
        tests/kernels/test_runner_window.py "tests/executor/test_model_runner.py::test_mixed_batch_matches_hf_on_cuda" \
        tests/executor/test_gpt_oss.py -k "gpt or sink or Sink" -q -p no:cacheprovider -ra 2>&1 \
        | grep -E "passed|failed|FAILED|rror" | tail -20 ;;
    draft-diag)  # session 30's miss: a checkpoint drafting for itself keeps 36% on the GPU; by setting
      timeout 300 python3 scripts/draft_diag.py ${DRAFT_DIAG:-} 2>&1 | grep -E "draft-diag|rror" | tail -12 ;;
    draft-diag2)  # which eager part: attention backend, decode order, splits; then PDL and the fused rope + KV write off
      timeout 200 python3 scripts/draft_diag.py eager eager-torch-attention eager-plain-order eager-one-split 2>&1 \
        | grep -E "draft-diag|rror" | tail -12
      PAGEDSERVE_PDL=0 PAGEDSERVE_FUSED_ROPE_KV=0 timeout 120 python3 scripts/draft_diag.py eager 2>&1 \
        | grep -E "draft-diag|rror" | tail -4 ;;
    gptoss-bench)  # gpt-oss-20b's shapes, random bf16 weights (~41 GB): batch-1 latency and the default workload
      python3 -m pagedserve.entrypoints.cli bench latency --model .devcache/gpt-oss-20b --load-format dummy \
        --output-json "$OUT/gptoss-latency.json" 2>&1 | tail -4
      python3 -m pagedserve.entrypoints.cli bench throughput --model .devcache/gpt-oss-20b --load-format dummy \
        --no-tqdm --output-json "$OUT/gptoss-throughput.json" 2>&1 | grep -E "throughput:|steps:|floor|rror" \
        | cut -c1-600 ;;
    gemma2-diag)  # Gemma 2's mixed step vs Transformers by step and request: caps on / off, Triton vs torch attention
      timeout 200 python3 scripts/gemma2_diag.py 2>&1 | grep -E "^(triton|torch) " ;;
    attn-test)  # the attention, rotary and norm kernels whole (plain, windowed, soft-capped, partial rotary), then the
      # runner through them vs Transformers (windows, Gemma, Phi-4-mini's rotary)
      timeout 420 python3 -m pytest tests/kernels/test_kernels.py tests/kernels/test_fused_ops.py \
        tests/kernels/test_runner_window.py -q -p no:cacheprovider -ra 2>&1 | grep -E "passed|failed|FAILED|rror" \
        | tail -20 ;;
    window-test)  # sliding windows (Gemma 3, Qwen2 with use_sliding_window): the kernels, then the engine vs Transformers;
      # the hybrid layout's window groups through captured graphs (test_runner_mixed_graph's hybrid cases)
      timeout 400 python3 -m pytest tests/kernels/test_kernels.py tests/kernels/test_runner_window.py \
        tests/kernels/test_fused_ops.py tests/kernels/test_runner_mixed_graph.py tests/gpu/test_window_gpu.py \
        -k "window or gemma or softcap or hybrid" -q -s -p no:cacheprovider \
        -ra 2>&1 | grep -E "window:|passed|failed|FAILED|rror" | tail -20 ;;
    hybrid-bench)  # gpt-oss-20b's shapes, long prompts: the hybrid KV layout (window groups; core/kv_cache.py) against
      # one table for every layer (--disable-hybrid-kv-cache-manager): blocks, requests at once, throughput
      for flag in "" --disable-hybrid-kv-cache-manager; do
        echo "hybrid-bench ${flag:-(hybrid)}"
        python3 -m pagedserve.entrypoints.cli bench throughput --model .devcache/gpt-oss-20b --load-format dummy \
          --num-prompts 128 --input-len 8192 --output-len 512 --max-model-len 9000 --no-tqdm $flag \
          --output-json "$OUT/hybrid-bench${flag:+-off}.json" 2>&1 \
          | grep -E "throughput:|steps:|KV cache|hybrid|preempt|rror" | cut -c1-600
      done ;;
    int4-test)  # 4-bit AWQ / GPTQ held packed: the W4A16 kernel compiled, then the engine vs Transformers
      timeout 400 python3 -m pytest tests/kernels/test_w4a16.py tests/gpu/test_int4_gpu.py -q -s -p no:cacheprovider \
        -ra 2>&1 | grep -E "int4:|passed|failed|FAILED|rror" | tail -20 ;;
    int4-bench)  # the 7B shapes as a 4-bit AWQ checkpoint (random 4-bit weights): batch-1 latency, default workload
      python3 -m pagedserve.entrypoints.cli bench latency --model .devcache/qwen2-7b-awq --load-format dummy \
        --output-json "$OUT/int4-latency.json" 2>&1 | tail -4
      python3 -m pagedserve.entrypoints.cli bench throughput --model .devcache/qwen2-7b-awq --load-format dummy \
        --no-tqdm --output-json "$OUT/int4-throughput.json" 2>&1 | grep -E "throughput:|steps:|floor|rror" | cut -c1-600 ;;
    moe-kernels)  # the experts of one Qwen3-30B-A3B layer: the kernels vs the torch loop (MOE_SWEEP=1: launch plans)
      timeout 500 python3 scripts/moe_kernel_bench.py --tokens "${MOE_TOKENS:-1,8,64,256,1024,8192}" ${MOE_SWEEP:+--sweep} \
        --output-json "$OUT/moe-kernels.json" 2>&1 | tail -200 ;;
    moe-bench)  # Qwen3-30B-A3B shapes, random bf16 weights: batch-1 latency and the default throughput workload
      python3 -m pagedserve.entrypoints.cli bench latency --model .devcache/qwen3-moe --load-format dummy \
        --output-json "$OUT/moe-latency.json" 2>&1 | tail -4
      python3 -m pagedserve.entrypoints.cli bench throughput --model .devcache/qwen3-moe --load-format dummy --no-tqdm \
        --output-json "$OUT/moe-throughput.json" 2>&1 | grep -E "throughput:|steps:|floor|rror" | cut -c1-600 ;;
    lora-kernels)  # the LoRA shrink / expand kernels vs the torch path, per layer at the 7B shapes (CUDA graphs)
      python3 scripts/lora_kernel_bench.py --tokens "${LORA_TOKENS:-1,16,64,139,256}" ${LORA_SWEEP:+--sweep} \
        --output-json "$OUT/lora-kernels.json" 2>&1 | tail -300 ;;
    gpu-quick)  # the GPU tests of the runner, graphs and async steps (not the kernel files)
      timeout 300 python3 -m pytest tests/gpu/test_async_gpu.py tests/gpu/test_precompile.py tests/executor \
        tests/kernels/test_runner_mixed_graph.py -q -m "not slow" -p no:cacheprovider -x 2>&1 | tail -4 ;;
    throughput-fused)
      PAGEDSERVE_FUSED_SAMPLER=1 python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy \
        --no-tqdm --output-json "$OUT/throughput-fused.json" 2>&1 | grep -vE "^frame #|^\[transformers\]" | tail -12 ;;
    sample)
      python3 -m pagedserve.executor.kernels.bench_kernels --tune sample ;;
    skinny)
      python3 scripts/bench_skinny_gemm.py --m 1 --shapes qkv,o,gate_up,down ;;
    fp8-test)  # quantization="fp8": its kernels against torch, then the engine against Transformers on fp8 weights
      timeout 400 python3 -m pytest tests/kernels/test_fp8.py tests/gpu/test_fp8_gpu.py -q -p no:cacheprovider -ra -s \
        2>&1 | grep -E "fp8 engine|fp8 checkpoint|bf16 logprob|W8A8 fp32 sums|passed|failed|^FAILED" | grep -v "print(f" | tail -40 ;;
    fp8-test-bf16)  # the bf16 engine's fp8 ways against Transformers doing the same arithmetic (prints the errors)
      timeout 300 python3 -m pytest tests/gpu/test_fp8_gpu.py -k bf16 -q -p no:cacheprovider -ra -s 2>&1 \
        | grep -E "bf16 logprob|passed|failed|Error" | tail -8 ;;
    fp8-gemm)  # fp8 weights, M=2..256: the skinny GEMM W8A16 and W8A8 tiles and quant + _scaled_mm vs cuBLAS bf16
      timeout 420 python3 scripts/bench_skinny_gemm.py --fp8 --quick --m ${FP8_M:-2,4,8,16,32,64,139,256} \
        --shapes qkv,o,gate_up,down 2>&1 | grep -E "^(qkv|o|gate_up|down) +M=|==|^    \(|^SKINNY|^FP8|^}" ;;
    fp8-gemm-b1)  # fp8 weights, M=1: every fma tile
      timeout 250 python3 scripts/bench_skinny_gemm.py --fp8 --m 1 --shapes qkv,o,gate_up,down 2>&1 \
        | grep -E "^(qkv|o|gate_up|down) +M=|==|^    \(|^SKINNY|^FP8|^}" ;;
    fp8-test-fp32)  # the fp32 engine's fp8 ways (default, W8A8 forced) against Transformers doing the same
      timeout 200 python3 -m pytest tests/gpu/test_fp8_gpu.py -k fp32 -q -p no:cacheprovider -ra -s 2>&1 \
        | grep -E "fp8 engine|passed|failed|^FAILED" | grep -v "print(f" | tail -8 ;;
    fp8-acc)  # W8A8 summation error: fp8 sums left in Hopper's accumulator or moved per tile, and cuBLAS
      timeout 200 python3 scripts/fp8_acc_probe.py 2>&1 | tail -12 ;;
    fp8-gemm-sums)  # the W8A8 sweep with the partial sums per tile, then left in the fp8 accumulator (PAGEDSERVE_FP8_SUMS)
      for v in tile full; do
        echo "== PAGEDSERVE_FP8_SUMS=$v"
        PAGEDSERVE_FP8_SUMS=$v timeout 250 python3 scripts/bench_skinny_gemm.py --fp8 --quick --m ${FP8_M:-2,16,139} \
          --shapes qkv,o,gate_up,down 2>&1 | grep -E "^(qkv|o|gate_up|down) +M=|^== whole"
      done ;;
    kvfp8)  # kv_cache_dtype=fp8: its kernel and runner tests on the GPU, then the default workload with a 16-bit and an fp8 cache
      timeout 300 python3 -m pytest tests/kernels/test_kv_fp8.py "tests/kernels/test_fp8.py::test_gpu_skinny_w8a8_fp32_sums" \
        -q -p no:cacheprovider -ra 2>&1 | grep -E "passed|failed|^FAILED|Error" | tail -12
      timeout 240 python3 -m pagedserve.executor.kernels.bench_kernels --tune decode-kv
      for kv in auto fp8 fp8-w8; do  # fp8-w8: fp8 KV cache and fp8 weights
        echo "== --kv-cache-dtype $kv"
        python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
          --kv-cache-dtype ${kv%-w8} $([ "$kv" = fp8-w8 ] && echo --quantization fp8) \
          --output-json "$OUT/throughput-kv-$kv.json" 2>&1 | grep -E "throughput:|decode:|floor|KV cache"
      done ;;
    fp8-throughput)  # the default workload with fp8 weights alone
      python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm \
        --quantization fp8 --output-json "$OUT/throughput-fp8.json" 2>&1 | tail -4 ;;
    fp8-bench)  # batch-1 latency and the default workload, bf16 then fp8, one machine
      for q in "" "--quantization fp8"; do
        echo "== ${q:-bf16}"
        python3 -m pagedserve.entrypoints.cli bench latency --model $M --load-format dummy $q 2>&1 | tail -4
        python3 -m pagedserve.entrypoints.cli bench throughput --model $M --load-format dummy --no-tqdm $q \
          --output-json "$OUT/throughput${q:+-fp8}.json" 2>&1 | tail -4
      done ;;
    skinny-b1)  # batch-1 qkv, o, down: every M=1 tile (and splits of the best) vs cuBLAS
      timeout 300 python3 scripts/bench_skinny_gemm.py --m 1 --shapes qkv,o,down ;;
    skinny-lm)  # the batch-1 LM head shape: skinny configs vs cuBLAS
      timeout 200 python3 scripts/bench_skinny_gemm.py --m 1 --shapes lm_head --quick ;;
    skinny-test)  # the skinny GEMM's tests on the GPU (M up to 256), stop at the first failure
      timeout 240 python3 -m pytest tests/kernels/test_skinny_gemm.py -x -q -p no:cacheprovider 2>&1 | tail -15 ;;
    work-test)  # the decode kernel (work list, order, splits) and the runner's work path on the GPU
      timeout 300 python3 -m pytest tests/kernels/test_kernels.py tests/kernels/test_runner_decode_work.py -k "decode" \
        -x -q -p no:cacheprovider 2>&1 | tail -8 ;;
    decode-work)  # the decode kernel at the default workload's batches: order vs work list
      timeout 200 python3 -m pagedserve.executor.kernels.bench_kernels --tune decode-work ;;
    tma-test)  # the skinny GEMM's TMA path on the GPU, stop at the first failure
      timeout 200 python3 -m pytest tests/kernels/test_skinny_gemm.py -k tma -x -q -p no:cacheprovider 2>&1 | tail -15 ;;
    skinny-tma)  # the TMA tiles at decode batches 64-256 vs cuBLAS (and the old dot path's heuristic)
      timeout 420 python3 scripts/bench_skinny_gemm.py --tma --m ${TMA_M:-64,128,144,192,256} --shapes qkv,o,gate_up,down ;;
    skinny-tail)  # two token tiles a program (128 + 16 at M = 144) vs cuBLAS and cuBLASLt, the default workload's decode M
      timeout ${TAIL_TIMEOUT:-330} python3 scripts/bench_skinny_gemm.py --tma --tail-only --lt --m ${TAIL_M:-144} \
        --shapes ${TAIL_SHAPES:-qkv,o,gate_up,down} ;;
    cublas-ladder)  # cuBLAS alone at every decode graph size 64..256 (step 8): where its tiles quantize
      timeout 200 python3 scripts/bench_skinny_gemm.py --cublas-only --shapes qkv,o,gate_up,down \
        --m "$(seq -s, 64 8 256)" ;;
    skinny-mid)  # the skinny GEMM at decode batches 16-256 vs cuBLAS
      timeout 330 python3 scripts/bench_skinny_gemm.py --m 16,64,128,256 --shapes qkv,o,gate_up,down ;;
    timeline-cmp)  # the comparison workload: admission steps' kernels, then idle gaps between decode steps at 256
      timeout 240 python3 scripts/step_timeline.py --model $M --output-len 512 --decode-at 256 2>&1 \
        | grep -vE "^\[transformers\]|USDT|profiler.py|self.profiler" ;;
    timeline-b1)  # batch-1 decode (128 in, 256 out): idle gaps between steps and the kernels of a step
      timeout 200 python3 scripts/step_timeline.py --model $M --num-prompts 1 --input-len 128 --output-len 256 \
        --decode-at 1 --decode-steps 12 2>&1 | grep -vE "^\[transformers\]|USDT|profiler.py|self.profiler" ;;
    timeline-def)  # the default workload: decode steps once ~139 run
      timeout 240 python3 scripts/step_timeline.py --model $M --output-len 100-1024 --decode-at 139 2>&1 \
        | grep -vE "^\[transformers\]|USDT|profiler.py|self.profiler" ;;
    *) echo "unknown phase $phase" ;;
  esac
}
# Each phase's whole output goes to <phase>.log, packed with the JSON files into $RETURN_DIR/gpu-logs.tgz
# after every phase (so a call stopped at its limit still returns the phases done); the tail is printed.
for phase in $phases; do
  echo "=== $phase $(date +%T)"
  run_phase "$phase" > "$OUT/$phase.log" 2>&1
  tar czf "$RETURN_DIR/gpu-logs.tgz" -C "$OUT" . 2>/dev/null
  case $phase in
    tests) grep -E "7B shapes|async vs sync|passed|failed|FAILED|rror" "$OUT/tests.log" | tail -25 ;;
    serve-bench*|serve-conc|serve-compiles|small-ab|serve-paths|serve-diag|serve-prof|prof-load|sample-filter|tput-filter|tput-pen|tput-chat|filter-warps|filter-diag) cat "$OUT/$phase.log" ;;
    timeline*|skinny-b1|tput-ab|steplog) tail -n 70 "$OUT/$phase.log" ;;
    serve|serve-ab) cat "$OUT/$phase.log" ;;
    profile*|probe|launch-probe|silu|skinny*|tma-test|skinny-test-entries|work-test|decode-work|tp-ab|lat-ab|gpu-quick|mixed-test|qkv-test|kernels-test|importprobe|sample|sample-test|filter-test|pen-test|importtime|decode-mix|check7b) grep -v "^\[transformers\]" "$OUT/$phase.log" | tail -n 45 ;;
    latency*) tail -n 5 "$OUT/$phase.log" ;;
    cublas-ladder) sed -n '/== cuBLAS per M/,$p' "$OUT/$phase.log" ;;
    *) tail -n 8 "$OUT/$phase.log" ;;
  esac
done
echo "=== done $(date +%T)"
