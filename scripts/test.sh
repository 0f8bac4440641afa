#!/usr/bin/env bash
# The project's test command (README, second command; .ci/run calls exactly this).
# Sets up .venv, checks style, then runs the whole suite; the tests start their own real
# tritonserver on free loopback ports and always stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# The suite in two parts (tests/parallel_plan.py says which tests go where, and why):
# 1. two workers side by side run every test that starts a tritonserver, except those marked
#    `alone` (a serial run: ACESTEP_TEST_WORKERS=0);
# 2. then the `alone` tests (they kill stub processes, or assert on machine-wide process state)
#    run by themselves, while the `in_process` tests (no tritonserver at all) run beside them at
#    the lowest CPU priority, on the core the `alone` tests leave idle.
# The 25 slowest tests of each run are printed in every CI log. Exit 5 (the arguments selected no
# test of a run) is no failure.
# One ONNX export of the tiny checkpoint for every run (tests/fixtures_onnx.py: published
# atomically, so the workers may race for it).
logs=$(mktemp -d)
niced=""
cleanup() {
  [ -n "$niced" ] && kill "$niced" 2>/dev/null
  rm -rf "$logs" "${owned_cache:-}"
}
trap cleanup EXIT
if [ -z "${ACESTEP_ONNX_CACHE:-}" ]; then
  owned_cache=$(mktemp -d)
  export ACESTEP_ONNX_CACHE=$owned_cache
fi
workers=${ACESTEP_TEST_WORKERS:-2}
passed() { [ "$1" = 0 ] || [ "$1" = 5 ]; }
servers=0
python -m pytest -q -n "$workers" --dist loadscope --no-loadscope-reorder --durations=25 \
  -m "not alone and not in_process" "$@" || servers=$?
in_process=0
# Niced in a session of its own whose scheduler group gets nice 19 too: under autogroup scheduling
# (kernel.sched_autogroup_enabled, on by default on many kernels) nice only orders the processes
# of one session, and every tritonserver runs in a session of its own, so plain `nice` still took
# a fair half of the CPU from the alone tests' servers.
in_process_run() {
  ACESTEP_TEST_IN_PROCESS=1 setsid -w bash -c '{ echo 19 > /proc/self/autogroup; } 2>/dev/null; exec nice -n 19 "$@"' \
    in_process python -m pytest -q -p no:cacheprovider -n "$(( workers > 0 ? 1 : 0 ))" --durations=25 \
    -m "in_process and not alone" "$@"
}
if [ "$workers" = 0 ]; then
  in_process_run "$@" || in_process=$?
else
  in_process_run "$@" > "$logs/in_process.log" 2>&1 &
  niced=$!
fi
alone=0
python -m pytest -q --durations=25 -m alone "$@" || alone=$?
if [ -n "$niced" ]; then
  wait "$niced" || in_process=$?
  niced=""
  echo "---- the in_process tests (run beside the alone ones, niced) ----"
  cat "$logs/in_process.log"
fi
for code in "$servers" "$alone" "$in_process"; do
  passed "$code" || exit "$code"
done
