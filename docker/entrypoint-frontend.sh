#!/usr/bin/env bash
# Entry point of the front-end image: the Gradio UI (acestep-frontend), talking to the server
# only over gRPC. Configured by environment so that compose and Kubernetes set it the same way:
#   ACESTEP_URL            host:port of the server's gRPC endpoint (default server:8001)
#   ACESTEP_FRONTEND_HOST  interface to listen on (default 0.0.0.0: reachable from outside)
#   ACESTEP_FRONTEND_PORT  port the UI listens on (default 7865)
# Extra arguments go to acestep-frontend (e.g. --max-duration 120 --concurrency 8).
set -euo pipefail
exec acestep-frontend --url "${ACESTEP_URL:-server:8001}" \
  --server-name "${ACESTEP_FRONTEND_HOST:-0.0.0.0}" --port "${ACESTEP_FRONTEND_PORT:-7865}" "$@"
