#!/usr/bin/env bash
# The whole GPU pass in one command, for the multi-GPU test host: installs the carried wheels
# (.whl/, from ../shared/device/fetch_wheels.sh), then runs the selected steps, each bounded by
# `timeout` and logging to $OUT/<step>.log, one summary line per step, a short table last.
#
#   usage: [OUT=/tmp/cupy_ep_out] [SUITE_BUDGET=530] [env knobs below] bash scripts/gpu_suite.sh [STEP ...]
#   steps (default "all" = tests internode bench baseline chaos soak, in that order):
#     tests      mpiexec -n R python -m pytest -q $PYTEST_FLAGS $TEST_TARGETS   for R in $RANKS ("4 3 2")
#     internode  the normal-mode tests with virtual hosts: CUPY_EP_TEST_NVL_PEERS=P on N ranks
#                for N:P in $INTERNODE_LAYOUTS ("4:2 4:1 2:1"); targets $INTERNODE_TESTS (default: the
#                tests/gpu files that use the nvl_peers fixture)
#     chaos      CUPY_EP_CHAOS=1 re-run of $CHAOS_TESTS on $CHAOS_RANKS (4) ranks (+ $CHAOS_PYTEST_ARGS)
#     soak       scripts/soak.py $SOAK_ARGS ("--time-budget 40": iterations for 40 s, then 200 create/destroy
#                cycles) on $SOAK_RANKS (4) ranks, without and with --chaos
#     example    scripts/moe_example.py --backend gpu (the README's example) on $EXAMPLE_RANKS ("1 2") ranks
#     bench      bench_intranode.py ($INTRANODE_ARGS; SWEEP=1 adds --sms 4,8,12,16,24) on $BENCH_RANKS (4),
#                bench_low_latency.py --profile ($LL_ARGS) on $LL_RANKS (4),
#                bench_internode.py ($INTERNODE_BENCH_ARGS) for N:P in $INTERNODE_BENCH_LAYOUTS ("4:2 4:1")
#     baseline   the OLD tree's bench_intranode.py and bench_low_latency.py --profile, from .baseline/
#                (skipped when that directory is missing)
#     torch      cupy_ep.torch (DeepEP's API on torch tensors): tests/gpu/check_torch_adapter.py under mpiexec and
#                tests/gpu/torchrun_deepep_loop.py under torchrun with a gloo and an NCCL group, on each of
#                $TORCH_RANKS ("2") ranks (skipped when $PY has no torch; not part of "all")
#     proxy      NVSHMEM's network (proxy) transport on one host (CUPY_EP_TEST_PROXY_TRANSPORT=1: P2P off, UCX over
#                TCP on the loopback, UCX from $UCX_DIR, default .whl/ucx), ranks sharing the GPUs: a probe of what
#                the transport needs (GDRCopy, NICs, UCX's transports) into proxy_probe.log, then
#                scripts/smoke_multihost.py at 2 ranks x 1 per domain; when it passes, the internode tests for
#                N:P in $PROXY_LAYOUTS ("2:1") with chaos off and on ($PROXY_CHAOS, "0 1"), test_low_latency.py
#                with ll_transport="rdma", soak.py --num-nvl-peers 1 ($PROXY_SOAK_ARGS) and bench_internode.py
#                on 2 ranks ($PROXY_BENCH_ARGS: bytes per destination domain); when it fails, the smoke again
#                with NVSHMEM_DEBUG=INFO (proxy_smoke_debug.log) and the rest skipped (not part of "all")
#     signal_cost  put signals (CUPY_EP_SIGNAL_AMO=0, the default) against NVSHMEM atomics (=1), in turns for
#                $SIGNAL_ROUNDS (2) rounds: bench_internode.py --num-nvl-peers 1 and bench_low_latency.py
#                --transport rdma on $SIGNAL_RANKS (2) ranks, then scripts/ab_compare.py (before = atomics,
#                after = put signals); with fewer GPUs than ranks only under SHARE_GPU=1, and then only the
#                ratio means something (not part of "all")
#     ab         before/after in turns: .baseline/'s and this tree's bench_intranode.py ($AB_INTRANODE_ARGS)
#                and bench_low_latency.py ($AB_LL_ARGS) on $BENCH_RANKS ranks, $AB_ROUNDS (4) rounds in
#                ABBA order, then scripts/ab_compare.py's medians and spreads (not part of "all")
#   per-step timeouts (seconds): TESTS_TIMEOUT (150, per rank count), INTERNODE_TIMEOUT (90, per layout),
#     CHAOS_TIMEOUT (90), SOAK_TIMEOUT (80, each), TORCH_TIMEOUT (150, each), BENCH_INTRANODE_TIMEOUT (120), BENCH_LL_TIMEOUT (90), AB_TIMEOUT (90, each),
#     BENCH_INTERNODE_TIMEOUT (120, per layout), BASELINE_TIMEOUT (120, each), EXAMPLE_TIMEOUT (120, each),
#     PROXY_SMOKE_TIMEOUT (270), PROXY_TIMEOUT (150, per layout and chaos setting), SIGNAL_TIMEOUT (180, each run).
#   SUITE_BUDGET (530 s): the whole run's wall-clock budget; a step gets min(its timeout, what is
#     left) and is skipped when less than MIN_STEP_S (20) is left, so `all` ends in about 9 minutes.
#   SHARE_GPU=1: run more ranks than GPUs (ranks share GPUs, time-sliced: correctness only; the
#     bench and baseline steps are skipped then, their numbers would mean nothing).
#   BUNDLE=1: at the end, pack everything under $OUT into $OUT/bundle.tgz (for hosts that return few files).
#   other knobs: PYTEST_FLAGS (default -x), TEST_TARGETS (tests/gpu), STACK_DUMP_S (60: a test running
#     longer dumps every thread's stack into the log), MPIEXEC, PYTHON (python3).
# A failing step never stops the others (no `set -e`); the exit status is 1 when any step failed.
# Several invocations with the same $OUT append to $OUT/summary.txt.
set -u
OUT=${OUT:-/tmp/cupy_ep_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
summary="$OUT/summary.txt"
suite_t0=$(date +%s)
echo "==== device" | tee -a "$summary"
nvidia-smi -L 2>&1 | tee -a "$summary"
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
PY=${PYTHON:-python3}
if ls .whl/mpich-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mp .whl/mpich-*.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvshmem4py*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} LD_LIBRARY_PATH=/tmp/mp/lib:${LD_LIBRARY_PATH:-} PATH=/tmp/mp/bin:$PATH
fi
BASE_PYTHONPATH=${PYTHONPATH:-}
export PYTHONPATH=$PWD${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}
# Prefix that runs a command in the old tree (.baseline/), its package first on PYTHONPATH.
IN_BASELINE=(bash -c 'cd "$1" && shift && exec "$@"' _ "$PWD/.baseline"
             env PYTHONPATH="$PWD/.baseline${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}")
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export CUPY_EP_CACHE_DIR=${CUPY_EP_CACHE_DIR:-$PWD/.cache/kernels}
# Unbuffered output and pytest's faulthandler: a step killed by its timeout still leaves the
# tests that ran and every rank's Python stack at the hang in its log.
export PYTHONUNBUFFERED=1
[[ ${SHARE_GPU:-} == 1 ]] && export CUPY_EP_TEST_SHARE_GPU=1
PYTEST="$PY -m pytest -q -p no:cacheprovider --durations=8 -o faulthandler_timeout=${STACK_DUMP_S:-60}"
MPIEXEC=${MPIEXEC:-mpiexec}
if $MPIEXEC --version 2>/dev/null | grep -qi "open mpi" && [[ $(id -u) == 0 ]]; then
  MPIEXEC="$MPIEXEC --allow-run-as-root"
fi
SUITE_BUDGET=${SUITE_BUDGET:-530}
MIN_STEP_S=${MIN_STEP_S:-20}
failed=0
lines=()
bench_logs=()

echo "$(date -u +%FT%TZ) cupy_ep gpu_suite: $ngpu GPUs, steps: ${*:-all}, budget ${SUITE_BUDGET} s, logs in $OUT" \
  | tee -a "$summary"

record() {  # record LINE: one summary line (printed now and in the final table)
  echo "$1" | tee -a "$summary"
  lines+=("$1")
}

step() {  # step NAME SECONDS CMD...: runs CMD under timeout, logs to $OUT/NAME.log, one summary line
  local name=$1 secs=$2; shift 2
  local left=$(( SUITE_BUDGET - ($(date +%s) - suite_t0) ))
  if (( left < MIN_STEP_S )); then
    record "$(printf '%-28s %-8s %5s s  %s' "$name" SKIPPED 0 "suite budget spent (${left} s left)")"
    return 0
  fi
  (( secs > left )) && secs=$left
  local t0; t0=$(date +%s)
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc != 0 )); then status="FAIL($rc)"; fi
  (( rc != 0 )) && failed=1
  local what
  what=$(grep -aE '^SUMMARY |^(PASS|FAIL) smoke_multihost|^=+ .*(passed|failed|error|skipped|no tests ran)|^[0-9]+ (passed|failed|error|skipped)|no tests ran|Error|error:' \
    "$OUT/$name.log" | grep -av '^\s*$' | tail -1 | cut -c1-200)
  [[ $status == TIMEOUT ]] && what="killed after ${secs} s; last line: $(grep -av '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)"
  record "$(printf '%-28s %-8s %5s s  %s' "$name" "$status" "$dt" "$what")"
  return $rc
}

skip() {  # skip NAME WHY
  record "$(printf '%-28s %-8s %5s s  %s' "$1" SKIPPED 0 "$2")"
}

fits() {  # fits N: N ranks fit on this host's GPUs (or may share them)
  (( $1 <= ngpu )) || [[ ${SHARE_GPU:-} == 1 ]]
}

fits_timed() {  # fits_timed N: N ranks on GPUs of their own (what a benchmark needs)
  (( $1 <= ngpu ))
}

run_tests() {
  for n in ${RANKS:-4 3 2}; do
    fits "$n" || { skip "tests_${n}ranks" "only $ngpu GPUs"; continue; }
    step "tests_${n}ranks" "${TESTS_TIMEOUT:-150}" $MPIEXEC -n "$n" $PYTEST ${PYTEST_FLAGS--x} \
      ${TEST_TARGETS:-tests/gpu}
  done
}

internode_targets() {
  if [[ -n ${INTERNODE_TESTS:-} ]]; then echo "$INTERNODE_TESTS"; return; fi
  local files
  files=$(grep -l "nvl_peers" tests/gpu/test_*.py 2>/dev/null | tr '\n' ' ')
  echo "${files:-tests/gpu}"
}

run_internode() {
  local targets; targets=$(internode_targets)
  for spec in ${INTERNODE_LAYOUTS:-4:2 4:1 2:1}; do
    local n=${spec%%:*} p=${spec##*:}
    fits "$n" || { skip "internode_${n}ranks_p${p}" "only $ngpu GPUs"; continue; }
    step "internode_${n}ranks_p${p}" "${INTERNODE_TIMEOUT:-90}" env CUPY_EP_TEST_NVL_PEERS="$p" \
      $MPIEXEC -n "$n" $PYTEST ${PYTEST_FLAGS--x} $targets
  done
}

run_chaos() {
  local n=${CHAOS_RANKS:-4} targets=${CHAOS_TESTS:-}
  if [[ -z $targets ]]; then
    for f in tests/gpu/test_normal.py tests/gpu/test_intranode.py tests/gpu/test_low_latency.py; do
      [[ -f $f ]] && targets="$targets $f"
    done
  fi
  fits "$n" || { skip chaos "only $ngpu GPUs"; return; }
  step chaos "${CHAOS_TIMEOUT:-90}" env CUPY_EP_CHAOS=1 $MPIEXEC -n "$n" $PYTEST ${PYTEST_FLAGS--x} \
    ${CHAOS_PYTEST_ARGS:-} ${targets:-tests/gpu}
}

run_example() {
  # The README's example on the GPU backend (--backend gpu: no silent fallback to the reference).
  for n in ${EXAMPLE_RANKS:-1 2}; do
    fits "$n" || { skip "example_${n}ranks" "only $ngpu GPUs"; continue; }
    # shellcheck disable=SC2086  # $MPIEXEC is a word list
    step "example_${n}ranks" "${EXAMPLE_TIMEOUT:-120}" $MPIEXEC -n "$n" $PY scripts/moe_example.py --backend gpu
  done
}

run_soak() {
  local n=${SOAK_RANKS:-4}
  [[ -f scripts/soak.py ]] || { skip soak "scripts/soak.py missing"; return; }
  fits "$n" || { skip soak "only $ngpu GPUs"; return; }
  # shellcheck disable=SC2086  # argument list
  step soak "${SOAK_TIMEOUT:-80}" $MPIEXEC -n "$n" $PY scripts/soak.py ${SOAK_ARGS:---time-budget 40}
  # shellcheck disable=SC2086
  step soak_chaos "${SOAK_TIMEOUT:-80}" $MPIEXEC -n "$n" $PY scripts/soak.py --chaos ${SOAK_ARGS:---time-budget 40}
}

run_bench() {
  local sweep=""
  [[ -n ${SWEEP:-} ]] && sweep="--sms 4,8,12,16,24"
  for n in ${BENCH_RANKS:-4}; do
    fits_timed "$n" || { skip "bench_intranode_${n}ranks" "only $ngpu GPUs"; continue; }
    step "bench_intranode_${n}ranks" "${BENCH_INTRANODE_TIMEOUT:-120}" $MPIEXEC -n "$n" $PY scripts/bench_intranode.py \
      --json "$OUT/bench_intranode_${n}ranks.json" --plot "$OUT/plots" ${INTRANODE_ARGS:---tokens 1024,2048,4096} $sweep
    bench_logs+=("$OUT/bench_intranode_${n}ranks.log")
  done
  for n in ${LL_RANKS:-4}; do
    fits_timed "$n" || { skip "bench_low_latency_${n}ranks" "only $ngpu GPUs"; continue; }
    step "bench_low_latency_${n}ranks" "${BENCH_LL_TIMEOUT:-90}" $MPIEXEC -n "$n" $PY scripts/bench_low_latency.py \
      --profile --json "$OUT/bench_low_latency_${n}ranks.json" ${LL_ARGS:-}
    bench_logs+=("$OUT/bench_low_latency_${n}ranks.log")
  done
  for spec in ${INTERNODE_BENCH_LAYOUTS:-4:2 4:1}; do
    local n=${spec%%:*} p=${spec##*:}
    fits_timed "$n" || { skip "bench_internode_${n}ranks_p${p}" "only $ngpu GPUs"; continue; }
    step "bench_internode_${n}ranks_p${p}" "${BENCH_INTERNODE_TIMEOUT:-120}" $MPIEXEC -n "$n" $PY \
      scripts/bench_internode.py --num-nvl-peers "$p" --json "$OUT/bench_internode_${n}ranks_p${p}.json" \
      ${INTERNODE_BENCH_ARGS:-}
    bench_logs+=("$OUT/bench_internode_${n}ranks_p${p}.log")
  done
}

run_baseline() {
  local base=$PWD/.baseline n=${BENCH_RANKS:-4}
  n=${n%% *}
  [[ -d $base/scripts ]] || { skip baseline "no .baseline/ tree"; return; }
  fits_timed "$n" || { skip baseline "only $ngpu GPUs"; return; }
  # the old tree's scripts and package, not this one's (its options: git show HEAD:scripts/bench_*.py)
  step "baseline_intranode_${n}ranks" "${BASELINE_TIMEOUT:-120}" "${IN_BASELINE[@]}" \
    $MPIEXEC -n "$n" $PY scripts/bench_intranode.py \
    --json "$OUT/baseline_intranode_${n}ranks.json" ${BASELINE_INTRANODE_ARGS:-}
  bench_logs+=("$OUT/baseline_intranode_${n}ranks.log")
  step "baseline_low_latency_${n}ranks" "${BASELINE_TIMEOUT:-120}" "${IN_BASELINE[@]}" \
    $MPIEXEC -n "$n" $PY scripts/bench_low_latency.py \
    --profile --json "$OUT/baseline_low_latency_${n}ranks.json" ${BASELINE_LL_ARGS:-}
  bench_logs+=("$OUT/baseline_low_latency_${n}ranks.log")
}

ab_run() {  # ab_run TREE(before|after) BENCH ROUND ARGS...: one benchmark run of one tree for the ab step
  local tree=$1 bench=$2 round=$3; shift 3
  local in_tree=()
  [[ $tree == before ]] && in_tree=("${IN_BASELINE[@]}")
  step "ab_${tree}_${bench}_${round}" "${AB_TIMEOUT:-90}" "${in_tree[@]}" \
    $MPIEXEC -n "$AB_N" $PY "scripts/bench_${bench}.py" --json "$OUT/ab_${tree}_${bench}_${round}.json" "$@"
}

run_ab() {  # the old (.baseline/) and this tree's benchmarks in turns (ABBA...), then one table per benchmark
  AB_N=${BENCH_RANKS:-4}; AB_N=${AB_N%% *}
  [[ -d $PWD/.baseline/scripts ]] || { skip ab "no .baseline/ tree"; return; }
  fits_timed "$AB_N" || { skip ab "only $ngpu GPUs"; return; }
  local i order
  for i in $(seq 1 "${AB_ROUNDS:-4}"); do
    order="before after"; (( i % 2 == 0 )) && order="after before"
    for tree in $order; do
      # shellcheck disable=SC2086  # argument lists
      ab_run "$tree" intranode "$i" ${AB_INTRANODE_ARGS:---tokens 4096 --iters 50 --no-baseline}
      # shellcheck disable=SC2086
      ab_run "$tree" low_latency "$i" ${AB_LL_ARGS:---profile --no-baseline}
    done
  done
  for bench in intranode low_latency; do
    $PY scripts/ab_compare.py --before "$OUT/ab_before_${bench}_*.json" --after "$OUT/ab_after_${bench}_*.json" \
      > "$OUT/ab_${bench}.txt" 2>&1
    bench_logs+=("$OUT/ab_${bench}.txt")
  done
}

proxy_probe() {  # proxy_probe UCX_DIR: what NVSHMEM's UCX transport needs on this host, one "key: value" a line
  local ucx=$1
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "gdrdrv: $([[ -e /dev/gdrdrv ]] && echo present || echo absent) (/dev/gdrdrv, GDRCopy's kernel module)"
  echo "libgdrapi: $(ldconfig -p 2>/dev/null | grep -o 'libgdrapi.so[.0-9]*' | head -1 || true)"
  echo "ib_devices: $(ls /sys/class/infiniband 2>/dev/null | tr '\n' ' ')"
  echo "libibverbs: $(ldconfig -p 2>/dev/null | grep -o 'libibverbs.so[.0-9]*' | head -1 || true)"
  echo "libfabric: $(ldconfig -p 2>/dev/null | grep -o 'libfabric.so[.0-9]*' | head -1 || true)"
  echo "nvshmem_ucx_plugin: $($PY -c 'import glob, os, nvidia.nvshmem as m; print(" ".join(os.path.basename(p) for p in glob.glob(os.path.join(list(m.__path__)[0], "lib", "nvshmem_transport_ucx*"))))' 2>&1)"
  echo "ucx_version: $(LD_LIBRARY_PATH="$ucx/lib:${LD_LIBRARY_PATH:-}" "$ucx/bin/ucx_info" -v 2>&1 | head -1)"
  echo "ucx_transports: $(LD_LIBRARY_PATH="$ucx/lib:${LD_LIBRARY_PATH:-}" UCX_MODULE_DIR="$ucx/lib/ucx" \
    "$ucx/bin/ucx_info" -d 2>&1 | grep -o 'Transport: [a-z_0-9]*' | sort -u | cut -d' ' -f2 | tr '\n' ' ')"
}

run_proxy() {
  local ucx=${UCX_DIR:-$PWD/.whl/ucx}
  [[ -x $ucx/bin/ucx_info && -d $ucx/lib ]] || { skip proxy "no UCX in $ucx (UCX_DIR; PyPI libucx-cu13)"; return; }
  local penv=(env CUPY_EP_TEST_PROXY_TRANSPORT=1 CUPY_EP_TEST_SHARE_GPU=1
              LD_LIBRARY_PATH="$ucx/lib:${LD_LIBRARY_PATH:-}" UCX_MODULE_DIR="$ucx/lib/ucx")
  proxy_probe "$ucx" > "$OUT/proxy_probe.log" 2>&1
  record "$(printf '%-28s %-8s %5s s  %s' proxy_probe info 0 \
    "$(grep -E '^(gdrdrv|ib_devices|ucx_transports):' "$OUT/proxy_probe.log" | cut -c1-60 | tr '\n' ';')")"
  # shellcheck disable=SC2086  # $MPIEXEC is a word list
  # the first run may compile the internode kernels (a minute or more without a carried .cache)
  if ! step proxy_smoke "${PROXY_SMOKE_TIMEOUT:-270}" "${penv[@]}" $MPIEXEC -n 2 $PY scripts/smoke_multihost.py \
      --num-nvl-peers 1 --time-limit $(( ${PROXY_SMOKE_TIMEOUT:-270} - 30 )); then
    # shellcheck disable=SC2086
    step proxy_smoke_debug 90 "${penv[@]}" NVSHMEM_DEBUG=INFO UCX_LOG_LEVEL=info $MPIEXEC -n 2 $PY \
      scripts/smoke_multihost.py --num-nvl-peers 1 --time-limit 60
    skip proxy_internode "the proxy transport did not carry the smoke test (proxy_smoke.log, proxy_smoke_debug.log)"
    return
  fi
  local targets; targets=$(internode_targets)
  for spec in ${PROXY_LAYOUTS:-2:1}; do
    local n=${spec%%:*} p=${spec##*:}
    for chaos in ${PROXY_CHAOS:-0 1}; do
      # shellcheck disable=SC2086
      step "proxy_internode_${n}ranks_p${p}_chaos${chaos}" "${PROXY_TIMEOUT:-150}" "${penv[@]}" \
        CUPY_EP_TEST_NVL_PEERS="$p" CUPY_EP_CHAOS="$chaos" $MPIEXEC -n "$n" $PYTEST ${PYTEST_FLAGS--x} $targets
    done
  done
  # the low-latency tests with NVSHMEM puts to every other rank (ll_transport="rdma"), skipped-call timeout included
  # shellcheck disable=SC2086
  step proxy_low_latency_rdma "${PROXY_TIMEOUT:-150}" "${penv[@]}" CUPY_EP_TEST_LL_TRANSPORT=rdma \
    $MPIEXEC -n 2 $PYTEST ${PYTEST_FLAGS--x} tests/gpu/test_low_latency.py
  # shellcheck disable=SC2086
  step proxy_soak "${PROXY_TIMEOUT:-150}" "${penv[@]}" $MPIEXEC -n 2 $PY scripts/soak.py --num-nvl-peers 1 \
    ${PROXY_SOAK_ARGS:---time-budget 40}
  # bytes and records per destination domain over the proxy transport (its times mean nothing)
  # shellcheck disable=SC2086
  step proxy_bench_internode "${PROXY_TIMEOUT:-150}" "${penv[@]}" $MPIEXEC -n 2 $PY scripts/bench_internode.py \
    --num-nvl-peers 1 --no-baseline --json "$OUT/proxy_bench_internode.json" ${PROXY_BENCH_ARGS:---tokens 1024 --iters 3}
  bench_logs+=("$OUT/proxy_bench_internode.log")
}

run_signal_cost() {  # put signals (CUPY_EP_SIGNAL_AMO=0) against atomics (1), in turns, then ab_compare
  local n=${SIGNAL_RANKS:-2} i amo order
  if ! fits_timed "$n"; then
    [[ ${SHARE_GPU:-} == 1 ]] || { skip signal_cost "only $ngpu GPUs for $n ranks (SHARE_GPU=1: ratio only)"; return; }
    record "$(printf '%-28s %-8s %5s s  %s' signal_cost info 0 "$n ranks share $ngpu GPU(s): compare the ratio, not the times")"
  fi
  for i in $(seq 1 "${SIGNAL_ROUNDS:-2}"); do
    order="1 0"; (( i % 2 == 0 )) && order="0 1"
    for amo in $order; do
      # shellcheck disable=SC2086  # argument lists
      step "signal_amo${amo}_internode_${i}" "${SIGNAL_TIMEOUT:-180}" env CUPY_EP_SIGNAL_AMO="$amo" \
        $MPIEXEC -n "$n" $PY scripts/bench_internode.py --num-nvl-peers 1 --no-baseline \
        --json "$OUT/signal_amo${amo}_internode_${i}.json" ${SIGNAL_INTERNODE_ARGS:---tokens 1024 --iters 10}
      # shellcheck disable=SC2086
      step "signal_amo${amo}_ll_${i}" "${SIGNAL_TIMEOUT:-180}" env CUPY_EP_SIGNAL_AMO="$amo" \
        $MPIEXEC -n "$n" $PY scripts/bench_low_latency.py --transport rdma --profile --no-baseline --no-graph \
        --json "$OUT/signal_amo${amo}_ll_${i}.json" ${SIGNAL_LL_ARGS:-}
    done
  done
  for bench in internode ll; do
    { echo "before = NVSHMEM atomics (CUPY_EP_SIGNAL_AMO=1), after = put signals (0), $n ranks"
      $PY scripts/ab_compare.py --before "$OUT/signal_amo1_${bench}_*.json" --after "$OUT/signal_amo0_${bench}_*.json"
    } > "$OUT/signal_cost_${bench}.txt" 2>&1
    bench_logs+=("$OUT/signal_cost_${bench}.txt")
  done
}

run_torch() {
  local why
  if ! why=$($PY -c "import torch" 2>&1); then
    skip torch "no torch in $PY ($(echo "$why" | tail -1 | cut -c1-120))"
    return
  fi
  for n in ${TORCH_RANKS:-2}; do
    fits "$n" || { skip "torch_${n}ranks" "only $ngpu GPUs"; continue; }
    step "torch_adapter_${n}ranks" "${TORCH_TIMEOUT:-150}" $MPIEXEC -n "$n" $PY tests/gpu/check_torch_adapter.py
    for backend in gloo nccl; do
      step "torch_loop_${backend}_${n}ranks" "${TORCH_TIMEOUT:-150}" $PY -m torch.distributed.run --standalone \
        --nproc-per-node "$n" tests/gpu/torchrun_deepep_loop.py --backend "$backend"
    done
  done
}

steps=("$@")
# shellcheck disable=SC2206  # STEPS is a word list
(( ${#steps[@]} == 0 )) && steps=(${STEPS:-all})
expanded=()
for s in "${steps[@]}"; do
  if [[ $s == all ]]; then expanded+=(tests internode bench baseline chaos soak); else expanded+=("$s"); fi
done
for s in "${expanded[@]}"; do
  case $s in
    tests) run_tests ;;
    internode) run_internode ;;
    chaos) run_chaos ;;
    soak) run_soak ;;
    example) run_example ;;
    bench) run_bench ;;
    baseline) run_baseline ;;
    ab) run_ab ;;
    torch) run_torch ;;
    proxy) run_proxy ;;
    signal_cost) run_signal_cost ;;
    *) record "$(printf '%-28s %-8s %5s s  %s' "$s" UNKNOWN 0 "not a step (tests internode chaos soak example bench baseline ab torch proxy signal_cost all)")"
       failed=1 ;;
  esac
done

for f in "${bench_logs[@]}"; do
  [[ -f $f ]] || continue
  echo "==== $(basename "$f" .log)"
  if grep -q '^=== summary table' "$f"; then
    sed -n '/^=== summary table/,$p' "$f"
  else
    grep -av '^\s*$' "$f" | tail -25
  fi
done
echo "==== summary ($(( $(date +%s) - suite_t0 )) s; logs and JSON in $OUT)"
printf '%-28s %-8s %5s    %s\n' step status time result
for l in "${lines[@]}"; do echo "$l"; done
if [[ ${BUNDLE:-} == 1 ]]; then   # one file back instead of many: $OUT/bundle.tgz (logs, JSON, plots)
  tar czf /tmp/cupy_ep_bundle.tgz -C "$OUT" --exclude=bundle.tgz . && rm -rf "${OUT:?}"/* \
    && mv /tmp/cupy_ep_bundle.tgz "$OUT/bundle.tgz"
fi
exit $failed
