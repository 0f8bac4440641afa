#!/usr/bin/env bash
# The GPU check: ACE-Step on one NVIDIA GPU, served by Triton and in-process, in one run of at
# most 10 minutes (it replaces scripts/gpu_check.sh, whose comparison is the section `inprocess`).
#
#   bash scripts/pack_gpu_carry.sh          # here, where pip works: writes .gpu_carry/ (~48 MiB)
#   bash scripts/gpu_serving_check.sh       # on the GPU machine, with .gpu_carry/ carried along
#   bash scripts/gpu_serving_check.sh --dry-run   # the same code on a CPU: tiny model, no carry (CI)
#
# Sections (SECTIONS, a comma list; default serving,lora); one that fails is recorded and the
# others still run (exit 5 at the end if any failed):
#   serving    (a)-(d) through Triton: phases 3-5 below (full-size checkpoint, build, measure);
#   lora       (e) what runtime LoRA adapters cost per DiT step, inside the measure phase;
#   inprocess  eager PyTorch vs our optimised path in-process (benchmarks/gpu_eager_vs_optimized.py,
#              random full-size DiT, no checkpoint, no server), plus a TensorRT engine of a
#              TRT_LAYERS-block DiT when `import tensorrt` works.
#
# Phases, each in its own time box, elapsed time printed per phase:
#   1. the machine: nvidia-smi, the Python stack, /dev/shm, disk;
#   2. the environment: unpack .gpu_carry/{triton,site}.tar.xz (tritonserver + the packages the
#      image lacks), find libpython3.12 for the Python-backend stub (else use the carried one), and
#      make one overlay venv (--without-pip) whose .pth puts the project, the carried packages and
#      the machine's site-packages on the path of the benchmark AND of the Triton model processes
#      (the stub ignores PYTHONPATH); placeholders for soundfile/cutlet where they are missing;
#   3. the official-layout random checkpoint (synthetic/full_size.py), loaded by the served
#      components as production loads a real one: LAYERS DiT blocks, default auto = the full 24
#      when the GPU has >= 45 GiB (three copies of the weights live at once: served, in-process
#      twin, eager baseline), else 8; dry run: the tiny checkpoint;
#   4. the repository: target gpu, runtime torch, text2music only, built with
#      --endpoint-instances text2music=ENDPOINT_INSTANCES;
#   5. benchmarks/gpu_serving.py measure: starts the carried tritonserver on the GPU with every
#      component refusing inputs that arrive through the host (ACESTEP_REQUIRE_DEVICE_INPUTS=1)
#      and measures (a) Triton vs the same compiled components in-process, (b) vs eager
#      sequential CFG, (c) throughput at concurrency 1/4/8 for 10/30/60 s requests, (e) runtime
#      LoRA, (d) peak memory, per served component its weights and torch.cuda.max_memory_allocated;
#   6. section inprocess, when chosen, with what is left of the budget.
# Results: $OUT (else a temporary folder): gpu_serving.md (tables for benchmarks/RESULTS.md),
# gpu_serving.json, section_*.json, tritonserver.log, gpu_serving_check.log; inprocess:
# inprocess.{json,md} (+ trt_inprocess.{json,md}).
#
# Settings (environment): OUT, SECTIONS (serving,lora), LAYERS (auto), ENDPOINT_INSTANCES (8; dry
# run 1), CARRY_DIR (.gpu_carry), WORK (/tmp/acestep_gpu_serving; dry run: a temporary folder),
# PYTHON (python3; dry run: .venv's), TOTAL_BUDGET (570 s; dry run 240), CKPT_TIMEOUT (240),
# BUILD_TIMEOUT (120), for the measure phase E2E_SECONDS, STEPS, REPEATS, LOAD_DURATIONS,
# CONCURRENCY, LOAD_STEPS, REQUESTS, and for inprocess AUDIO_SECONDS (60), INPROCESS_STEPS (27,60),
# INPROCESS_REPEATS (2), INPROCESS_TIMEOUT (360), TRT_LAYERS (8), TRT_TIMEOUT (420).
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,45p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "[gpu_serving_check] ERROR: unknown argument $arg (--dry-run, --help)" >&2; exit 2 ;;
  esac
done

# checked before anything is created
SECTIONS=",${SECTIONS:-serving,lora},"
for s in ${SECTIONS//,/ }; do
  case "$s" in serving|lora|inprocess) ;; *) echo "[gpu_serving_check] ERROR: unknown section $s (serving, lora, inprocess)" >&2; exit 2 ;; esac
done
want() { [[ "$SECTIONS" == *",$1,"* ]]; }
FAILED_SECTIONS=()
if [[ $DRY_RUN -eq 1 ]]; then
  DEFAULT_PY="$ROOT/.venv/bin/python"
  [[ -x "$DEFAULT_PY" ]] || DEFAULT_PY=python3
  PY="${PYTHON:-$DEFAULT_PY}"
  TOTAL_BUDGET="${TOTAL_BUDGET:-240}"
  ENDPOINT_INSTANCES="${ENDPOINT_INSTANCES:-1}"
  WORK="${WORK:-$(mktemp -d /tmp/gpu_serving_dry.XXXXXX)}"
  TARGET=cpu
  THREADS=1
else
  PY="${PYTHON:-python3}"
  TOTAL_BUDGET="${TOTAL_BUDGET:-570}"
  ENDPOINT_INSTANCES="${ENDPOINT_INSTANCES:-8}"
  WORK="${WORK:-/tmp/acestep_gpu_serving}"
  TARGET=gpu
  THREADS=0
fi
LAYERS="${LAYERS:-auto}"
CARRY="${CARRY_DIR:-$ROOT/.gpu_carry}"
CKPT_TIMEOUT="${CKPT_TIMEOUT:-240}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-120}"
RESULTS="${OUT:-}"
if [[ -z "$RESULTS" ]]; then
  RESULTS="$(mktemp -d /tmp/gpu_serving.XXXXXX)"
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_serving_check.log"
: >"$LOG"
STARTED=$SECONDS

log() { echo "[gpu_serving_check +$((SECONDS - STARTED))s] $*" | tee -a "$LOG"; }
fail() { echo "[gpu_serving_check +$((SECONDS - STARTED))s] ERROR: $1" | tee -a "$LOG" >&2; exit "${2:-1}"; }
left() { echo $((TOTAL_BUDGET - (SECONDS - STARTED))); }
box() { # the smaller of a phase's own time box and what is left of the whole (minus a reserve)
  local own=$1 reserve=${2:-0} rest
  rest=$(( $(left) - reserve ))
  (( rest < own )) && own=$rest
  (( own < 5 )) && fail "no time left for the next phase (TOTAL_BUDGET=${TOTAL_BUDGET}s)" 4
  echo "$own"
}
# phase NAME SECONDS COMMAND...: run it in its time box, print the elapsed time, stop on failure
phase() {
  local name=$1 seconds=$2 began=$SECONDS status
  shift 2
  log "phase $name (time box ${seconds}s): $*"
  set +e
  timeout --kill-after=15 "$seconds" "$@" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  set -e
  log "phase $name: $((SECONDS - began))s, exit $status"
  if [[ $status -eq 124 || $status -eq 137 ]]; then
    fail "phase $name exceeded its ${seconds}s time box" 4
  elif [[ $status -ne 0 ]]; then
    fail "phase $name failed (exit $status); see $LOG" 4
  fi
}

log "mode: $([[ $DRY_RUN -eq 1 ]] && echo 'dry run (CPU, tiny model)' || echo 'GPU'); sections ${SECTIONS:1:-1}; work $WORK; results $RESULTS; budget ${TOTAL_BUDGET}s"

# ---------------------------------------------------------------- 1. the machine
if [[ $DRY_RUN -eq 0 ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs an NVIDIA GPU and driver (or --dry-run)" 2
  GPU_INFO="$(timeout 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader)" \
    || fail "nvidia-smi failed: no usable NVIDIA GPU" 2
  log "GPU: $GPU_INFO"
  if [[ "$LAYERS" == "auto" ]]; then
    TOTAL_MIB="$(timeout 30 nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1 | tr -dc '0-9' || true)"
    if (( ${TOTAL_MIB:-0} >= 46080 )); then LAYERS=24; else LAYERS=8; fi
    log "LAYERS=auto: $LAYERS DiT blocks for ${TOTAL_MIB:-?} MiB of GPU memory (24 from 45 GiB)"
  fi
fi
[[ "$LAYERS" == "auto" ]] && LAYERS=24  # dry run: unused (the tiny checkpoint)
command -v "$PY" >/dev/null 2>&1 || [[ -x "$PY" ]] || fail "no Python interpreter $PY (set PYTHON)" 2
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
log "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
log "/dev/shm: $(df -m /dev/shm 2>/dev/null | awk 'NR==2 {print $4 " MiB free"}' || echo 'not mounted')"
if [[ $DRY_RUN -eq 0 ]]; then
  rm -rf "$WORK"
  mkdir -p "$WORK"
  FREE_MB="$(df -Pm "$WORK" | awk 'NR==2 {print $4}')"
  NEED_MB=$(( 2500 + LAYERS * 350 ))  # ~0.29 GB of bf16 weights per DiT block + encoders, DCAE, vocoder
  (( FREE_MB >= NEED_MB )) || fail "$WORK has $FREE_MB MB free, the checkpoint needs about $NEED_MB MB (set WORK)" 2
fi
mkdir -p "$WORK"

# ---------------------------------------------------------------- 2. the carry
TRITON_ROOT=""
SITE=""
if [[ $DRY_RUN -eq 0 ]]; then
  for f in triton.tar.xz site.tar.xz; do
    [[ -f "$CARRY/$f" ]] || fail "$CARRY/$f missing: run 'bash scripts/pack_gpu_carry.sh' where pip works and carry .gpu_carry" 3
  done
  began=$SECONDS
  rm -rf "$WORK/carry"
  timeout 120 "$PY" - "$CARRY" "$WORK/carry" <<'EOF' || fail "could not unpack the carry in $CARRY" 3
import sys, tarfile
carry, dest = sys.argv[1], sys.argv[2]
for name in ("triton", "site"):
    with tarfile.open(f"{carry}/{name}.tar.xz") as archive:  # Python's lzma: no xz binary needed
        try:
            archive.extractall(f"{dest}/{name}", filter="tar")
        except TypeError:  # Python without extraction filters
            archive.extractall(f"{dest}/{name}")
EOF
  TRITON_ROOT="$WORK/carry/triton"
  SITE="$WORK/carry/site"
  log "carry unpacked in $((SECONDS - began))s: $(du -sh "$WORK/carry" | cut -f1)"
  [[ -x "$TRITON_ROOT/pytriton/tritonserver/bin/tritonserver" ]] || fail "the carry has no tritonserver binary" 3
  [[ -f "$TRITON_ROOT/pytriton/tritonserver/python_backend_stubs/$PYVER/triton_python_backend_stub" ]] \
    || fail "the carry has no Python-backend stub for Python $PYVER (it was packed for: $(ls "$TRITON_ROOT/pytriton/tritonserver/python_backend_stubs"))" 3
  # The stub loads libpython$PYVER.so.1.0: the interpreter's own if it has one, else the carried copy
  # (appended, so TritonInstall's LIBDIR entry still comes first).
  if ! "$PY" - <<'EOF'; then
import os, sys, sysconfig
name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
dirs = [sysconfig.get_config_var("LIBDIR") or "", os.path.join(sys.base_prefix, "lib")]
sys.exit(0 if any(os.path.isfile(os.path.join(d, name)) for d in dirs) else 1)
EOF
    if ldconfig -p 2>/dev/null | grep -q "libpython$PYVER.so.1.0"; then
      log "libpython$PYVER.so.1.0: from the system linker cache"
    elif [[ -f "$TRITON_ROOT/fallback-lib/libpython$PYVER.so.1.0" ]]; then
      export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$TRITON_ROOT/fallback-lib"
      log "libpython$PYVER.so.1.0: this Python has none; using the carried copy"
    else
      fail "no libpython$PYVER.so.1.0 for the Python-backend stub (this Python is static, nothing carried)" 3
    fi
  fi
fi
# One overlay virtualenv for the benchmark AND the Triton model processes: the Python-backend stub
# runs its interpreter isolated (PYTHONPATH is ignored there) and finds its packages through the
# `python3` first on PATH, which TritonInstall sets to the running interpreter's bin/. So a .pth
# file in this venv puts, in order: the project (src/, client/), the carried packages (numpy 1.26
# before the machine's numpy 2), the machine's own site-packages, then the placeholders.
began=$SECONDS
VENV="$WORK/venv"
PLACEHOLDERS="$WORK/placeholders"
rm -rf "$VENV"
timeout 120 "$PY" -m venv --without-pip "$VENV" || fail "'$PY -m venv --without-pip' failed" 3
VPY="$VENV/bin/python"
VSITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
"$PY" - "$VSITE/acestep_gpu_serving.pth" "$ROOT" "$SITE" "$PLACEHOLDERS" <<'EOF' || fail "could not write the venv's .pth" 3
import os, site, sys
pth, root, carried, holders = sys.argv[1:5]
lines = [f"{root}/src", f"{root}/client"] + ([carried] if carried else [])
lines += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
sites = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
lines += [f"import site; site.addsitedir({d!r})" for d in sites if os.path.isdir(d)]
lines.append(holders)
with open(pth, "w") as f:
    f.write("\n".join(lines) + "\n")
EOF
unset PYTHONPATH
timeout 60 "$VPY" benchmarks/gpu_serving.py placeholders "$PLACEHOLDERS" 2>&1 | tee -a "$LOG" \
  || fail "could not write the placeholders" 3
log "overlay venv $VENV ready in $((SECONDS - began))s"
PY="$VPY"
# both this process's compilations and the server's land here (the server's then hit the cache)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}"

set +e
DRY_RUN=$DRY_RUN timeout 180 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, importlib.metadata as md, os, sys
dry = os.environ["DRY_RUN"] == "1"
import numpy, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {numpy.__version__} "
      f"from {os.path.dirname(numpy.__file__)}")
if not dry:
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    print(f"torch device: {torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
if int(numpy.__version__.split(".")[0]) >= 2:
    sys.exit("numpy >= 2 first on the path: the Python-backend stub of Triton 2.51 needs numpy 1 (as_numpy() gives "
             "zeros otherwise); the carry brings numpy 1.26")
missing = []
for module in ("tritonclient.grpc", "tritonclient.grpc.aio", "google.protobuf", "grpc", "safetensors", "tokenizers",
               "transformers", "diffusers.models.autoencoders.autoencoder_dc", "py3langid", "pypinyin", "num2words",
               "hangul_romanize", "cutlet", "soundfile", "acestep_triton.serving.torch_runtime",
               "acestep_triton.sampling.buckets", "acestep_client.client"):
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing.append(f"{module} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
for dist in ("tritonclient", "grpcio", "protobuf", "diffusers", "transformers", "tokenizers"):
    print(f"{dist} {md.version(dist)}")
EOF
STATUS=${PIPESTATUS[0]}
set -e
[[ $STATUS -eq 0 ]] || fail "the Python stack is incomplete (see above)" 3
if [[ $DRY_RUN -eq 0 ]]; then
  TREE="$TRITON_ROOT/pytriton/tritonserver"
  ldd "$TREE/bin/tritonserver" 2>/dev/null | grep -q "not found" && fail "tritonserver misses libraries: $(ldd "$TREE/bin/tritonserver" | grep 'not found' | tr '\n' ' ')" 3
fi

# ---------------------------------------------------------------- 3.-5. section serving (+ lora)
# section NAME STATUS: record how a section's last phase ended (non-fatal: the next sections run)
section_done() {
  local name=$1 status=$2
  if [[ $status -eq 0 ]]; then
    log "section $name: ok"
  else
    FAILED_SECTIONS+=("$name (exit $status)")
    log "section $name: FAILED (exit $status); the other sections still run"
  fi
}
if want serving; then
  if [[ $DRY_RUN -eq 1 ]]; then
    T="$(box 60 60)" || exit 4
    phase checkpoint "$T" "$PY" -m acestep_triton.cli checkpoint tiny "$WORK/ckpt"
  else
    T="$(box "$CKPT_TIMEOUT" 240)" || exit 4
    phase checkpoint "$T" "$PY" -m acestep_triton.synthetic full-size "$WORK/ckpt" --layers "$LAYERS" --device cuda
    log "checkpoint: $LAYERS DiT blocks, $(du -sh "$WORK/ckpt" | cut -f1)"
  fi

  T="$(box "$BUILD_TIMEOUT" 60)" || exit 4
  phase build "$T" "$PY" benchmarks/gpu_serving.py build --checkpoint "$WORK/ckpt" \
    --workdir "$WORK/deploy" --target "$TARGET" --endpoint-instances "text2music=$ENDPOINT_INSTANCES" \
    --threads "$THREADS"

  MEASURE=(benchmarks/gpu_serving.py measure --checkpoint "$WORK/ckpt" --repository "$WORK/deploy/repository"
           --out "$RESULTS")
  [[ $DRY_RUN -eq 1 ]] && MEASURE+=(--dry-run)
  [[ -n "$TRITON_ROOT" ]] && MEASURE+=(--triton-root "$TRITON_ROOT")
  want lora || MEASURE+=(--no-lora)
  for pair in E2E_SECONDS:--e2e-seconds STEPS:--steps REPEATS:--repeats LOAD_DURATIONS:--load-durations \
              CONCURRENCY:--concurrency LOAD_STEPS:--load-steps REQUESTS:--requests; do
    var="${pair%%:*}"
    if [[ -n "${!var:-}" ]]; then MEASURE+=("${pair#*:}" "${!var}"); fi
  done
  RESERVE=0
  want inprocess && RESERVE=$(( DRY_RUN == 1 ? 60 : 150 ))  # what the inprocess section gets at least
  SECONDS_LEFT="$(box 600 $(( 5 + RESERVE )))" || exit 4
  # the benchmark's own budget leaves time to stop the server and write the memory table
  MEASURE+=(--time-budget $(( SECONDS_LEFT > 120 ? SECONDS_LEFT - 45 : SECONDS_LEFT * 2 / 3 )))
  set +e
  log "phase measure (time box ${SECONDS_LEFT}s): $PY ${MEASURE[*]}"
  began=$SECONDS
  # every component refuses an input that reaches it through the host (issue 18): on the GPU a
  # request then fails naming the input, so a run that measured anything proves the device path
  ACESTEP_REQUIRE_DEVICE_INPUTS=1 timeout --kill-after=20 "$SECONDS_LEFT" "$PY" "${MEASURE[@]}" 2>&1 | tee -a "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
  log "phase measure: $((SECONDS - began))s, exit $STATUS"
  if [[ -f "$RESULTS/tritonserver.log" ]] && (( $(stat -c %s "$RESULTS/tritonserver.log") > 8388608 )); then
    tail -c 8388608 "$RESULTS/tritonserver.log" >"$RESULTS/tritonserver.log.tail" && mv "$RESULTS/tritonserver.log.tail" "$RESULTS/tritonserver.log"
  fi
  echo
  [[ -f "$RESULTS/gpu_serving.md" ]] && cat "$RESULTS/gpu_serving.md"
  if [[ $STATUS -eq 124 || $STATUS -eq 137 ]]; then
    log "the measurement exceeded its ${SECONDS_LEFT}s time box; what it measured is in $RESULTS"
  elif [[ $STATUS -ne 0 ]]; then
    log "the measurement reported errors (see above, $RESULTS/gpu_serving.json 'sections' and tritonserver.log)"
  fi
  section_done serving "$STATUS"
fi

# ---------------------------------------------------------------- 6. section inprocess
if want inprocess; then
  AUDIO_SECONDS="${AUDIO_SECONDS:-60}"
  INPROCESS_STEPS="${INPROCESS_STEPS:-27,60}"
  INPROCESS_REPEATS="${INPROCESS_REPEATS:-2}"
  BENCH=(benchmarks/gpu_eager_vs_optimized.py --seconds "$AUDIO_SECONDS" --steps "$INPROCESS_STEPS"
         --repeats "$INPROCESS_REPEATS" --trt off --json "$RESULTS/inprocess.json" --markdown "$RESULTS/inprocess.md")
  if [[ $DRY_RUN -eq 1 ]]; then
    BENCH+=(--model tiny --device cpu --warmup-steps 1)  # checks the script, not compiler speed
  else
    BENCH+=(--model full --layers "$LAYERS" --compile)
  fi
  T="$(box "${INPROCESS_TIMEOUT:-360}" 5)" || exit 4
  set +e
  log "phase inprocess (time box ${T}s): $PY ${BENCH[*]}"
  began=$SECONDS
  timeout --kill-after=15 "$T" "$PY" "${BENCH[@]}" 2>&1 | tee -a "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
  log "phase inprocess: $((SECONDS - began))s, exit $STATUS"
  [[ -f "$RESULTS/inprocess.md" ]] && cat "$RESULTS/inprocess.md"
  section_done inprocess "$STATUS"
  if [[ $DRY_RUN -eq 0 ]] && "$PY" -c "import tensorrt" >/dev/null 2>&1 && (( $(left) > 180 )); then
    TRT_LAYERS="${TRT_LAYERS:-8}"
    T="$(box "${TRT_TIMEOUT:-420}" 5)" || exit 4
    log "phase inprocess-tensorrt: a ${TRT_LAYERS}-block DiT engine (time box ${T}s)"
    set +e
    timeout --kill-after=15 "$T" "$PY" benchmarks/gpu_eager_vs_optimized.py --model full --layers "$TRT_LAYERS" \
      --seconds "$AUDIO_SECONDS" --steps "$INPROCESS_STEPS" --repeats "$INPROCESS_REPEATS" --trt on \
      --trt-build-timeout $(( T > 240 ? T - 120 : T / 2 )) --json "$RESULTS/trt_inprocess.json" \
      --markdown "$RESULTS/trt_inprocess.md" 2>&1 | tee -a "$LOG"
    STATUS=${PIPESTATUS[0]}
    set -e
    section_done inprocess-tensorrt "$STATUS"
  elif [[ $DRY_RUN -eq 0 ]]; then
    log "tensorrt is not importable (or no time is left): the TensorRT comparison is skipped"
  fi
fi

if [[ $DRY_RUN -eq 1 && -z "${KEEP_WORK:-}" ]]; then
  rm -rf "$WORK"
fi
if (( ${#FAILED_SECTIONS[@]} > 0 )); then
  fail "sections that failed: ${FAILED_SECTIONS[*]}; everything else measured is in $RESULTS" 5
fi
log "done in $((SECONDS - STARTED))s; results in $RESULTS"
