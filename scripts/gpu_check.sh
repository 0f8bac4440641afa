#!/usr/bin/env bash
# GPU check: eager PyTorch vs our optimised path on one NVIDIA GPU, full-size random ACE-Step DiT.
#
# Runs from a clean checkout in well under 9 minutes on one H100/H200-class GPU:
#   1. prints the GPU (nvidia-smi) and the Python stack; fails fast with a clear message;
#   2. installs carried wheels from .whl/ when that folder exists (pip --no-index --no-deps
#      --target /tmp/site; nothing is downloaded), or the project's gpu extra when
#      INSTALL_EXTRAS=1 and the machine can reach a package index;
#   3. benchmarks/gpu_eager_vs_optimized.py with the full-size random transformer (24 blocks x 2560,
#      bf16): 60 s of audio at 27 and 60 steps, eager-sequential vs optimized (batched CFG + CUDA
#      graphs), printing the RTF of both and their ratio;
#   4. when `import tensorrt` works: the same comparison plus a TensorRT DiT engine, with a reduced
#      DiT depth (TRT_LAYERS, default 8) so that export + engine build fit the time box.
# Results go to $OUT (results.json, results.md, trt_results.*, gpu_check.log) when OUT is set.
#
# Settings (environment): LAYERS (24), AUDIO_SECONDS (60), STEPS (27,60), REPEATS (2),
# BENCH_TIMEOUT (360 s), TRT_LAYERS (8), TRT_TIMEOUT (420 s), PYTHON (python3), INSTALL_EXTRAS (0),
# COMPILE (1 on GPU, 0 in CPU mode: add the TorchInductor-compiled + CUDA-graph variant).
# GPU_CHECK_CPU=1 runs the same script on a CPU with the tiny model (what the test suite does).
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LAYERS="${LAYERS:-24}"
AUDIO_SECONDS="${AUDIO_SECONDS:-60}"
STEPS="${STEPS:-27,60}"
REPEATS="${REPEATS:-2}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-360}"
TRT_LAYERS="${TRT_LAYERS:-8}"
TRT_TIMEOUT="${TRT_TIMEOUT:-420}"
CPU_MODE="${GPU_CHECK_CPU:-0}"
RESULTS="${OUT:-}"
if [[ -z "$RESULTS" ]]; then
  RESULTS="$(mktemp -d /tmp/gpu_check.XXXXXX)"
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
STARTED=$SECONDS

log() { echo "[gpu_check +$((SECONDS - STARTED))s] $*" | tee -a "$LOG"; }
fail() { echo "[gpu_check] ERROR: $1" | tee -a "$LOG" >&2; exit "${2:-1}"; }

# ---------------------------------------------------------------- 1. the machine
if [[ "$CPU_MODE" == "1" ]]; then
  log "CPU mode (GPU_CHECK_CPU=1): tiny model on the CPU, no GPU needed"
else
  command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs an NVIDIA GPU and driver" 2
  GPU_INFO="$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)" \
    || fail "nvidia-smi failed: no usable NVIDIA GPU" 2
  log "GPU: $GPU_INFO"
fi

# ---------------------------------------------------------------- 2. packages
if [[ -d "$ROOT/.whl" ]] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  log "installing carried wheels: $(cd "$ROOT/.whl" && ls -- *.whl | tr '\n' ' ')"
  timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl || fail "pip could not install the wheels in .whl/" 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [[ "${INSTALL_EXTRAS:-0}" == "1" ]]; then
  log "installing the project with its gpu extra (INSTALL_EXTRAS=1)"
  timeout 300 "$PY" -m pip install -q -e "$ROOT/client" -e "$ROOT[gpu]" || fail "pip install -e .[gpu] failed" 3
fi
# A bare checkout: the code is imported from the tree (an installed copy is fine too).
export PYTHONPATH="$ROOT/src:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}"

timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG" || fail "the Python stack is incomplete (see above)" 3
import importlib.util, os, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
cpu = os.environ.get("GPU_CHECK_CPU") == "1"
if not cpu and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
if not cpu:
    major, minor = torch.cuda.get_device_capability()
    print(f"torch device: {torch.cuda.get_device_name()} (compute capability {major}.{minor})")
missing = [name for name in ("diffusers", "safetensors", "numpy") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)} (carry their wheels in .whl/, see benchmarks/README.md)")
import diffusers
from diffusers.models.autoencoders.autoencoder_dc import Decoder  # noqa: F401  (the DCAE needs it)
print(f"diffusers {diffusers.__version__}")
for name in ("tensorrt", "soundfile"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {'present' if spec else 'absent'}")
EOF

HAVE_TRT=0
if "$PY" -c "import tensorrt" >/dev/null 2>&1; then
  HAVE_TRT=1
  log "tensorrt $("$PY" -c 'import tensorrt; print(tensorrt.__version__)') is importable"
else
  log "tensorrt is not importable: the TensorRT comparison is skipped"
fi

# ---------------------------------------------------------------- 3. eager vs optimized (torch)
BENCH=(benchmarks/gpu_eager_vs_optimized.py --seconds "$AUDIO_SECONDS" --steps "$STEPS" --repeats "$REPEATS")
COMPILE_DEFAULT=1
if [[ "$CPU_MODE" == "1" ]]; then
  COMPILE_DEFAULT=0  # the CPU smoke run checks the script, not compiler speed
fi
if [[ "${COMPILE:-$COMPILE_DEFAULT}" == "1" ]]; then
  BENCH+=(--compile)  # adds the TorchInductor-compiled variant
fi
if [[ "$CPU_MODE" == "1" ]]; then
  BENCH+=(--model tiny --device cpu --warmup-steps 1)
else
  BENCH+=(--model full --layers "$LAYERS")
fi
log "running: ${BENCH[*]} (time box ${BENCH_TIMEOUT}s)"
set +e
timeout "$BENCH_TIMEOUT" "$PY" "${BENCH[@]}" --trt off --json "$RESULTS/results.json" \
  --markdown "$RESULTS/results.md" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
if [[ $STATUS -eq 124 ]]; then
  fail "the benchmark exceeded ${BENCH_TIMEOUT}s; partial results (if any) are in $RESULTS/results.json" 4
elif [[ $STATUS -ne 0 ]]; then
  fail "the benchmark failed (exit $STATUS); see $LOG" 4
fi

# ---------------------------------------------------------------- 4. with TensorRT, when present
if [[ $HAVE_TRT -eq 1 && "$CPU_MODE" != "1" ]]; then
  log "TensorRT comparison with a ${TRT_LAYERS}-block DiT (time box ${TRT_TIMEOUT}s)"
  set +e
  timeout "$TRT_TIMEOUT" "$PY" benchmarks/gpu_eager_vs_optimized.py --model full --layers "$TRT_LAYERS" \
    --seconds "$AUDIO_SECONDS" --steps "$STEPS" --repeats "$REPEATS" --trt on \
    --trt-build-timeout $((TRT_TIMEOUT - 120)) --json "$RESULTS/trt_results.json" \
    --markdown "$RESULTS/trt_results.md" 2>&1 | tee -a "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
  [[ $STATUS -eq 0 ]] || log "WARNING: the TensorRT comparison did not finish (exit $STATUS); the torch results stand"
fi

log "done in $((SECONDS - STARTED))s; results in $RESULTS"
echo
cat "$RESULTS/results.md"
