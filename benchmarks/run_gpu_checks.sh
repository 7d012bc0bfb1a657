#!/usr/bin/env bash
# Build, test and benchmark jitmoe on a bare GPU machine with no internet.
#
#   benchmarks/run_gpu_checks.sh OUTDIR [PHASES]
#
# PHASES is a comma list (default: all) of
#   install  - install the wheels brought along in .whl/ (deps the machine lacks) and jitmoe itself (editable)
#   timing   - cold build + warm first call of one router module and the default fused-MoE module (time_jit.py)
#   prewarm  - build every module the GPU tests use, in parallel
#   test     - the GPU tests (pytest -m gpu); summary in OUTDIR/pytest_gpu.txt, junit XML beside it
#   bench    - the benchmarks (JSON + PNG)
#   demo     - `jitmoe demo` (router + MoE layer: error vs reference, first-call and steady times)
#   pack     - pack the JIT cache into OUTDIR/jitcache.tgz.part-* (carry it back as .jitcache next time)
# Env knobs: BENCH_GIT_COMMIT (recorded with the results), TESTS (pytest paths), PYTEST_ARGS, PREWARM_OPS, TIMING_CASES, BENCHES, BENCH_ARGS.
# Logs and results are packed into OUTDIR/results.tgz at the end so that few files travel back.
set -uo pipefail
OUT=${1:?usage: run_gpu_checks.sh OUTDIR [PHASES]}
PHASES=${2:-install,timing,prewarm,test,bench,pack}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
export JITMOE_CACHE_DIR=${JITMOE_CACHE_DIR:-$PWD/.jitcache}
LOG="$OUT/logs"
has() { [[ ",$PHASES," == *",$1,"* ]]; }
step() { echo "=== $1 ($(date +%T))"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
jitmoe() { python3 -m jitmoe "$@"; }

# The GPU machine gets a copy of the tree without .git: the caller passes the commit it ran on.
echo "${BENCH_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$LOG/commit.txt"
if has install; then step install; jitmoe env > "$LOG/env.txt" 2>&1; nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1; fi
if has timing; then step timing; python3 benchmarks/time_jit.py --out "$LOG" ${TIMING_CASES:+--cases $TIMING_CASES} 2>&1 | tee "$LOG/time_jit.log"; fi
if has prewarm; then
  step prewarm
  jitmoe prewarm --op ${PREWARM_OPS:-all} --dtype fp32,bf16,fp16 --topk 1,2,4,8,16,32,64,128,256 -j 16 2>&1 | tee "$LOG/prewarm.log" | tail -5
fi
if has test; then
  step test
  python3 -m pytest ${TESTS:-tests/gpu} -m gpu -q -rfEs -p no:cacheprovider --junitxml="$LOG/junit_gpu.xml" \
    ${PYTEST_ARGS:-} 2>&1 | tee "$LOG/pytest_gpu.log" | tail -40
  tail -3 "$LOG/pytest_gpu.log" > "$LOG/pytest_gpu.txt"
fi
if has bench; then
  step bench
  for b in ${BENCHES:-bench_routers bench_fused_moe exp_topk_latency}; do
    [ -f "benchmarks/$b.py" ] && python3 "benchmarks/$b.py" --out "$LOG" ${BENCH_ARGS:-} 2>&1 | tee "$LOG/$b.log" | tail -25
  done
fi
if has demo; then step demo; python3 -m jitmoe demo 2>&1 | tee "$LOG/demo.txt"; fi
tar czf "$OUT/results.tgz" -C "$OUT" logs
if has pack; then
  step pack
  tar czf - -C "$JITMOE_CACHE_DIR" --exclude=./tmp . | split -b 15m - "$OUT/jitcache.tgz.part-"
  ls -la "$OUT"
fi
