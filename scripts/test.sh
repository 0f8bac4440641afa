#!/usr/bin/env bash
# The project's test command (README, second command; .ci/run calls exactly this).
# Sets up .venv, checks style, then runs the whole suite; the tests start their own real
# tritonserver on free loopback ports and always stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q --durations=25 "$@"  # the slowest tests, in every CI log
