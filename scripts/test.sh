#!/usr/bin/env bash
# The project's test command (README, second command; .ci/run calls exactly this).
# Sets up .venv, checks style, then runs the whole suite; the tests start their own real
# tritonserver on free loopback ports and always stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# Two workers side by side (tests/parallel_plan.py says which tests run together; a serial run:
# ACESTEP_TEST_WORKERS=0), then the tests marked `alone`: they kill stub processes, or assert on
# machine-wide process state (tests/parallel_plan.py says why neither shares the cores). The
# 25 slowest tests of each part are printed in every CI log. Exit 5 (the arguments selected no
# test of a part) is no failure.
# One ONNX export of the tiny checkpoint for both parts (tests/fixtures_onnx.py: published
# atomically, so the workers may race for it).
if [ -z "${ACESTEP_ONNX_CACHE:-}" ]; then
  ACESTEP_ONNX_CACHE=$(mktemp -d)
  trap 'rm -rf "$ACESTEP_ONNX_CACHE"' EXIT
  export ACESTEP_ONNX_CACHE
fi
status=0
python -m pytest -q -n "${ACESTEP_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder --durations=25 \
  -m "not alone" "$@" || status=$?
[ "$status" = 5 ] && status=0
alone=0
python -m pytest -q --durations=25 -m alone "$@" || alone=$?
[ "$alone" = 5 ] && alone=0
exit $(( status != 0 ? status : alone ))
