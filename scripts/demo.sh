#!/usr/bin/env bash
# The README's first command: set everything up on a fresh machine, serve the tiny random
# checkpoint with a real tritonserver on the CPU, and write a demo audio file through the gRPC
# client (demo_out/demo_0.wav plus its parameters JSON). Extra arguments go to
# `acestep-triton demo` (e.g. --duration 20 --steps 60 --format flac).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
acestep-triton demo "$@"
