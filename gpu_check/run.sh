#!/usr/bin/env bash
# make gpu-check: the GPU checks of issue 12 on one H100/H200 in under 10 minutes, with the machine's own
# python3 (torch, triton, timm, transformers, peft, pytest; opacus optional, from .gpu/wheels if carried
# along). Each stage has its own timeout (50 + 120 + 110 + 200 + 90 s = 9 min 30 s at most) and a failing
# stage does not stop the next. Outputs in $OUT (default ./gpu_check_out): *.txt logs, compile.json,
# numerics.json, bench.json, bench.md (paste into benchmarks/RESULTS.md), batched.json (issue 14: client
# batching vs sequential rounds on the paper-smoke Swin-T).
#   DRYRUN=1   every stage on the CPU under the Triton interpreter at tiny shapes (< 2 minutes)
#   QUICK=1    shorter model-level benchmark (N=8, fewer rounds)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PY:-python3}
export OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
DRYRUN=${DRYRUN:-0}
export DRYRUN
if [ "$DRYRUN" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO/kernels/src:$REPO:$HERE${PYTHONPATH:+:$PYTHONPATH}"
if ls "$REPO"/.gpu/wheels/*.whl >/dev/null 2>&1 && ! $PY -c "import opacus" 2>/dev/null; then
  $PY -m pip install -q --no-deps --target "$OUT/.site" "$REPO"/.gpu/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$OUT/.site"
fi
cd "$REPO"
T0=$(date +%s)
STATUS=0
stage() {   # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "######## $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.txt"
  echo "######## $name: exit $rc"
  echo "$name $rc" >> "$OUT/stages.txt"
  [ $rc = 0 ] || STATUS=1
}
: > "$OUT/stages.txt"
if [ "$DRYRUN" = 1 ]; then
  stage 0_compile 120 $PY kernels/tests/aot_compile.py --set rep --arch 90 --json "$OUT/compile.json"
  stage 1_kernel_tests 120 $PY -m pytest kernels/tests/test_kernels_per_sample.py -q -x -p no:cacheprovider \
    -k "N3k1T1 and float32" -o addopts=""
else
  stage 0_compile 50 $PY kernels/tests/aot_compile.py --set rep --arch 80 90 --json "$OUT/compile.json"
  # natively on the GPU, gpu-marked tests included (the compile test runs in stage 0)
  stage 1_kernel_tests 120 $PY -m pytest kernels/tests -q -p no:cacheprovider -o addopts="" \
    -m "not slow" --ignore=kernels/tests/test_kernels_compile.py --durations=5
fi
stage 2_numerics 110 $PY "$HERE/numerics.py"
stage 3_bench 200 $PY "$HERE/bench.py"
# issue 14 on the GPU: a round's 4 clients in lock-step vs one after another, paper-smoke Swin-T at 224²
# (the dry run: the CPU-sized smoke task, one local step)
if [ "$DRYRUN" = 1 ]; then
  stage 4_batched 90 env LALORA_SMOKE_SIZE=cpu LALORA_CACHE="$OUT/.cache" $PY benchmarks/batched_clients.py \
    --task smoke-swin-t --device cpu --local-steps 1 --reps 1 --rounds 1 --json "$OUT/batched.json"
else
  stage 4_batched 90 env LALORA_CACHE="$OUT/.cache" $PY benchmarks/batched_clients.py \
    --task smoke-swin-t --device cuda --local-steps 5 --reps 1 --rounds 2 --json "$OUT/batched.json"
fi
echo; echo "gpu-check done in $(( $(date +%s) - T0 ))s; stages (name exit):"; cat "$OUT/stages.txt"
echo "outputs in $OUT (bench.md: paste into benchmarks/RESULTS.md)"
exit $STATUS
