#!/usr/bin/env bash
# The whole GPU pass in one command, for the multi-GPU test host (see README "Running on GPUs"):
# installs the carried wheels (.whl/, from ../shared/device/fetch_wheels.sh), runs the GPU test
# suite on 4, 3 and 2 ranks, then the benchmarks; logs go to $OUT (default /tmp/cupy_ep_out)
# and a short table is printed last. Every multi-rank step is bounded by `timeout`.
#   usage: [RANKS="4 3 2"] [PYTEST_FLAGS="-x"] [BENCH_RANKS="4"] [SWEEP=1 | CONFIGS="24/768/12,24/768/8"] [LL_ENGINE=1]
#          bash scripts/gpu_suite.sh [tests|bench|all] [pytest targets/args (default tests/gpu)]
# Several invocations with the same $OUT append to one summary.
set -u
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/cupy_ep_out}
mkdir -p "$OUT"
if ls .whl/mpich-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mp .whl/mpich-*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvshmem4py*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} LD_LIBRARY_PATH=/tmp/mp/lib:${LD_LIBRARY_PATH:-} PATH=/tmp/mp/bin:$PATH
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUPY_EP_CACHE_DIR=${CUPY_EP_CACHE_DIR:-$PWD/.cache/kernels}
summary="$OUT/summary.txt"
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi -L | head -1 | tee -a "$summary"

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s) $(grep -aE '^[0-9]+ (passed|failed)|passed|failed|error' "$OUT/$name.log" | tail -1)" | tee -a "$summary"
  return $rc
}

if [[ $what == tests || $what == all ]]; then
  for n in ${RANKS:-4 3 2}; do
    (( n <= ngpu )) || continue
    step "gpu_tests_${n}ranks" ${TEST_TIMEOUT:-420} mpiexec -n "$n" python3 -m pytest -q ${PYTEST_FLAGS--x} \
      -p no:cacheprovider "${@:-tests/gpu}"
  done
fi
if [[ $what == bench || $what == all ]]; then
  for n in ${BENCH_RANKS:-4}; do
    (( n <= ngpu )) || continue
    step "bench_intranode_${n}ranks" ${BENCH_TIMEOUT:-300} mpiexec -n "$n" python3 scripts/bench_intranode.py \
      --json "$OUT/bench_intranode_${n}ranks.json" ${SWEEP:+--sweep} ${CONFIGS:+--configs "$CONFIGS"}
  done
  step bench_low_latency 200 mpiexec -n 4 python3 scripts/bench_low_latency.py --profile \
    --json "$OUT/bench_low_latency.json"
  if [[ -n ${LL_ENGINE:-} ]]; then   # the kernels without the Buffer's Python layer, for comparison
    step bench_low_latency_engine 200 mpiexec -n 4 python3 scripts/bench_low_latency.py --front engine --profile \
      --experts 288 --json "$OUT/bench_low_latency_engine.json"
  fi
fi
echo "==== summary"; cat "$summary"
for f in "$OUT"/bench_*.log; do [[ -f $f ]] && { echo "==== $f"; grep -v '^\s*$' "$f" | tail -25; }; done
