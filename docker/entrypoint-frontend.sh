#!/usr/bin/env bash
# Entry point of the front-end image: the Gradio UI, talking to the server only over gRPC.
# Configured by environment so that compose and Kubernetes set it the same way:
#   ACESTEP_SERVER_URL     host:port of the server's gRPC endpoint (default server:8001)
#   ACESTEP_FRONTEND_PORT  port the UI listens on (default 7865)
# GRADIO_SERVER_NAME=0.0.0.0 (set in the image) makes it reachable from outside the container.
# Extra arguments go to acestep-frontend.
set -euo pipefail
exec acestep-frontend --server-url "${ACESTEP_SERVER_URL:-server:8001}" \
  --port "${ACESTEP_FRONTEND_PORT:-7865}" "$@"
