#!/usr/bin/env bash
# Entry point of both server images (GPU: NGC tritonserver; CPU demo: the pip-bundled server)
# and of the Kubernetes initContainer that prepares the model repository.
#
#   entrypoint-server.sh [run]       build the repository if there is none, then serve it (default)
#   entrypoint-server.sh build       only build (the Kubernetes initContainer does this)
#   entrypoint-server.sh serve [..]  only serve; extra arguments go to tritonserver
#   entrypoint-server.sh download    fetch the official checkpoint into $ACESTEP_CHECKPOINT
#   entrypoint-server.sh <command>   anything else runs as a command (e.g. bash, acestep-triton)
#
# Everything lives under one folder, $ACESTEP_MODELS_DIR (default /models), because a rendered
# repository names its assets folder by absolute path: it must be served where it was built.
#   $ACESTEP_MODELS_DIR/checkpoint   input, official layout (mounted read-only), or $ACESTEP_CHECKPOINT
#   $ACESTEP_MODELS_DIR/{onnx,assets,repository}   written by `acestep-triton build`
# A repository that already exists is served as it is (mount one to skip the build), except one
# this script built for another GPU: TensorRT engines only run on the GPU model (and TensorRT
# version) they were built on, so a GPU build records where it was made and is redone elsewhere.
set -euo pipefail

MODELS_DIR=${ACESTEP_MODELS_DIR:-/models}
CHECKPOINT=${ACESTEP_CHECKPOINT:-$MODELS_DIR/checkpoint}
REPOSITORY=$MODELS_DIR/repository
STAMP=$MODELS_DIR/.acestep-build
TARGET=${ACESTEP_TARGET:-gpu}
# Component runtime (acestep-triton build --runtime): empty = the target's default (gpu: torch,
# compiled PyTorch + CUDA graphs; cpu: onnx); "tensorrt" builds engines on this GPU.
RUNTIME=${ACESTEP_RUNTIME:-}
TINY=${ACESTEP_TINY_CHECKPOINT:-0}
CHECKPOINT_WAIT_S=${ACESTEP_CHECKPOINT_WAIT_S:-0}

log() { echo "[acestep-entrypoint] $*" >&2; }

die() {
  log "error: $*"
  exit 1
}

# What a GPU build depends on besides the checkpoint: the GPU model and the TensorRT version.
build_identity() {
  if [ "$TARGET" != gpu ]; then
    echo "target=$TARGET${RUNTIME:+ runtime=$RUNTIME}"
    return
  fi
  local gpu trt
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  trt=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
  echo "target=gpu${RUNTIME:+ runtime=$RUNTIME} gpu=${gpu:-unknown} tensorrt=${trt:-unknown}"
}

# The checkpoint is complete: every official file and the lyric vocabulary are present.
checkpoint_complete() {
  python3 - "$CHECKPOINT" "${ACESTEP_VOCAB:-}" <<'PY' >/dev/null 2>&1
import sys
from pathlib import Path

from acestep_triton.checkpoint import CheckpointLayout

layout = CheckpointLayout(Path(sys.argv[1]))
layout.validate()
layout.find_vocab(sys.argv[2] or None)
PY
}

ensure_checkpoint() {
  if [ "$TINY" = 1 ] && [ ! -e "$CHECKPOINT/ace_step_transformer/config.json" ]; then
    log "writing the tiny random checkpoint (demo only) to $CHECKPOINT"
    acestep-triton checkpoint tiny "$CHECKPOINT" >/dev/null
  fi
  local waited=0
  until checkpoint_complete; do
    if [ "$waited" -ge "$CHECKPOINT_WAIT_S" ]; then
      die "no complete checkpoint at $CHECKPOINT (official layout plus lyrics vocab). Mount it there" \
          "(read-only is fine), run '$(basename "$0") download', or set ACESTEP_TINY_CHECKPOINT=1 for the demo."
    fi
    if [ "$waited" -eq 0 ]; then
      log "waiting up to ${CHECKPOINT_WAIT_S}s for a complete checkpoint at $CHECKPOINT"
    fi
    sleep 10
    waited=$((waited + 10))
  done
}

repository_current() {
  [ -d "$REPOSITORY" ] && [ -n "$(ls -A "$REPOSITORY" 2>/dev/null)" ] || return 1
  [ "${ACESTEP_REBUILD:-0}" = 1 ] && return 1
  # Built elsewhere and mounted: trust it. Built here: it must match this machine.
  [ -f "$STAMP" ] || return 0
  [ "$(cat "$STAMP")" = "$(build_identity)" ]
}

build() {
  if repository_current; then
    log "model repository $REPOSITORY is present; not rebuilding (ACESTEP_REBUILD=1 forces it)"
    return 0
  fi
  if [ -f "$STAMP" ] && [ -d "$REPOSITORY" ]; then
    log "the repository was built for '$(cat "$STAMP")', this is '$(build_identity)': rebuilding"
  fi
  ensure_checkpoint
  local args=(--checkpoint "$CHECKPOINT" --workdir "$MODELS_DIR")
  if [ -n "${ACESTEP_VOCAB:-}" ]; then
    args+=(--vocab "$ACESTEP_VOCAB")
  fi
  if [ "$TARGET" != cpu ]; then
    # TensorRT engines are compiled for the GPU they are built on, so this runs on the target node.
    args+=(--target "$TARGET")
  fi
  if [ -n "$RUNTIME" ]; then
    args+=(--runtime "$RUNTIME")
  fi
  log "building the $TARGET model repository from $CHECKPOINT into $MODELS_DIR"
  mkdir -p "$MODELS_DIR"
  acestep-triton build "${args[@]}"
  build_identity > "$STAMP"
}

serve() {
  [ -d "$REPOSITORY" ] || die "no model repository at $REPOSITORY (run '$(basename "$0") build' first)"
  local extra=()
  if [ "$TARGET" = gpu ]; then
    extra+=(--allow-gpu-metrics=true)  # nv_gpu_* series on :8002 (the last occurrence wins)
  fi
  # shellcheck disable=SC2206  # ACESTEP_TRITON_ARGS is a whitespace-separated option list
  extra+=(${ACESTEP_TRITON_ARGS:-} "$@")
  log "serving $REPOSITORY (http ${ACESTEP_HTTP_PORT:-8000}, grpc ${ACESTEP_GRPC_PORT:-8001}," \
      "metrics ${ACESTEP_METRICS_PORT:-8002})"
  exec acestep-triton serve --repository "$REPOSITORY" \
    --http-port "${ACESTEP_HTTP_PORT:-8000}" --grpc-port "${ACESTEP_GRPC_PORT:-8001}" \
    --metrics-port "${ACESTEP_METRICS_PORT:-8002}" \
    --startup-timeout "${ACESTEP_STARTUP_TIMEOUT_S:-1800}" -- "${extra[@]}"
}

command=${1:-run}
[ $# -gt 0 ] && shift
case "$command" in
  run) build; serve "$@" ;;
  build) build ;;
  serve) serve "$@" ;;
  download)
    log "downloading the official checkpoint into $CHECKPOINT"
    exec acestep-triton checkpoint download "$CHECKPOINT" "$@" ;;
  *) exec "$command" "$@" ;;
esac
