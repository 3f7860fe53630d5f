#!/usr/bin/env bash
# The threshold kernel on a GPU, case by case (scripts/filter_diag.py: subprocesses with timeouts), then its
# timings (bench_kernels --tune sample-filter). When a default case hangs or keeps wrong sets, two failing
# cases are tried with one tile of loads in flight and without the radix top-k, and the timings run under the first that passes. Every line
# goes to stdout and to $OUT/filter-diag.txt as it comes, so a call cut short keeps what it printed.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/filter-diag.txt"
bad="TIMEOUT|WRONG|rc [0-9]"
timeout 250 python3 scripts/filter_diag.py 2>&1 | tee "$log"
good=""
if grep -qE "$bad" "$log"; then
  good=none
  for v in PAGEDSERVE_FILTER_STAGES=1 PAGEDSERVE_FILTER_RADIX=0; do
    echo "-- $v" | tee -a "$log"
    res=$(env $v FILTER_DIAG_CASES="16:topk:0 256:both:0" timeout 80 python3 scripts/filter_diag.py 2>&1)
    echo "$res" | tee -a "$log"
    if ! grep -qE "$bad" <<< "$res"; then good=$v; break; fi
  done
fi
if [ "$good" != none ]; then
  echo "-- sample-filter ${good:-(defaults)}" | tee -a "$log"
  env $good timeout "${SF_TIMEOUT:-400}" python3 -m pagedserve.executor.kernels.bench_kernels --tune sample-filter \
    2>&1 | tee -a "$log"
fi
