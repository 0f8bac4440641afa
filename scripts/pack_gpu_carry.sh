#!/usr/bin/env bash
# Pack what scripts/gpu_serving_check.sh (the one GPU check, every section: serving, lora, inprocess)
# needs on a bare GPU machine into one ignored folder.
#
# The lent GPU image has Python 3.12, torch (CUDA) and numpy 2, but no tritonserver, no
# tritonclient, no diffusers and no lyric libraries, cannot install anything, and takes at most
# 64 MiB of extra files with the working tree. So this packs, here (where pip works):
#
#   triton.tar.xz  the CUDA-capable tritonserver of this venv's nvidia-pytriton wheel, laid out as
#                  in site-packages (pytriton/tritonserver/{bin,backends/python,caches,
#                  python_backend_stubs/3.12} + nvidia_pytriton.libs/, whose RPATHs expect exactly
#                  that), without the stubs for other Pythons and the bundled libpython3.13; plus a
#                  stripped libpython3.12.so.1.0 as a fallback for an image that lacks its own
#                  (the 3.12 stub links it; the check uses it only when the machine has none);
#   site.tar.xz    the cp312 manylinux wheels of the exact versions this venv runs, unpacked with
#                  `pip install --no-deps --target` for Python 3.12 here: tritonclient and its
#                  gRPC needs (python-rapidjson, ml_dtypes, packaging, grpcio + typing_extensions, protobuf: the
#                  generated code of tritonclient 2.73 refuses grpcio < 1.81 and protobuf < 6.33),
#                  numpy 1.26 (the stub of Triton 2.51 reads numpy arrays with the numpy-1 ABI:
#                  under numpy 2 as_numpy() returns zeros), diffusers (the DCAE) and the lyric
#                  libraries (py3langid, pypinyin, num2words, hangul-romanize). Packed as one xz
#                  tarball because the wheels alone are 41 MB and the tree 110 MB: compressed,
#                  both fit (about 48 MiB);
#   MANIFEST.json  what is in there: versions, sha256, sizes.
#
# Not carried: soundfile and cutlet (Japanese romaji needs a 47 MB dictionary): the check
# writes placeholders for them (benchmarks/gpu_serving.py placeholders), which text2music with
# English lyrics never really uses.
#
# Usage: bash scripts/pack_gpu_carry.sh          (writes .gpu_carry/, prints its size)
# Settings: CARRY_DIR (.gpu_carry), PYTHON (.venv/bin/python), CARRY_LIMIT_MIB (60),
# CARRY_STUBS (3.12; add e.g. "3.12 3.11" to try the carry with this machine's Python),
# PYTHON312_LIB (a libpython3.12.so.1.0 to carry as the fallback; default: found via pyenv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${CARRY_DIR:-$ROOT/.gpu_carry}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LIMIT_MIB="${CARRY_LIMIT_MIB:-60}"
STUBS="${CARRY_STUBS:-3.12}"
# distribution names as the venv knows them; the version of each is the one installed here
DISTS=(tritonclient python-rapidjson ml_dtypes packaging grpcio protobuf typing_extensions numpy diffusers
       py3langid pypinyin num2words hangul-romanize)
STARTED=$SECONDS

log() { echo "[pack_gpu_carry +$((SECONDS - STARTED))s] $*"; }
fail() { echo "[pack_gpu_carry] ERROR: $*" >&2; exit 1; }

[[ -x "$PY" ]] || fail "no Python at $PY (run scripts/setup.sh first, or set PYTHON)"
SITE="$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("pytriton"); print(pathlib.Path(next(iter(s.submodule_search_locations))).parent)' 2>/dev/null)" \
  || fail "nvidia-pytriton is not installed in $PY's environment"
TREE="$SITE/pytriton/tritonserver"
[[ -x "$TREE/bin/tritonserver" ]] || fail "no tritonserver binary under $TREE"
for version in $STUBS; do
  [[ -f "$TREE/python_backend_stubs/$version/triton_python_backend_stub" ]] \
    || fail "the nvidia-pytriton tree has no Python-backend stub for Python $version"
done

STAGE="$(mktemp -d /tmp/gpu_carry.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
rm -rf "$CARRY"
mkdir -p "$CARRY"

# ---------------------------------------------------------------- 1. the tritonserver tree
log "tritonserver tree from $SITE (stubs: $STUBS)"
T="$STAGE/triton"
mkdir -p "$T/pytriton/tritonserver/backends/python" "$T/pytriton/tritonserver/python_backend_stubs" "$T/fallback-lib"
cp -a "$TREE/bin" "$TREE/caches" "$T/pytriton/tritonserver/"
cp -a "$TREE/backends/python/libtriton_python.so" "$TREE/backends/python/triton_python_backend_utils.py" \
  "$T/pytriton/tritonserver/backends/python/"
for version in $STUBS; do
  cp -a "$TREE/python_backend_stubs/$version" "$T/pytriton/tritonserver/python_backend_stubs/"
done
mkdir -p "$T/nvidia_pytriton.libs"
# libpython3-*.so is the 3.13 stub's interpreter: the 3.12 stub uses the machine's (or ours)
find "$SITE/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3-*' -exec cp -a {} "$T/nvidia_pytriton.libs/" \;
find "$T" -name __pycache__ -prune -exec rm -rf {} +

LIBPY="${PYTHON312_LIB:-}"
if [[ -z "$LIBPY" ]]; then
  LIBPY="$(ls -1 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/lib/libpython3.12.so.1.0 2>/dev/null | tail -n 1 || true)"
fi
if [[ -n "$LIBPY" && -f "$LIBPY" ]]; then
  strip --strip-unneeded -o "$T/fallback-lib/libpython3.12.so.1.0" "$LIBPY" 2>/dev/null \
    || cp "$LIBPY" "$T/fallback-lib/libpython3.12.so.1.0"
  log "fallback libpython3.12 from $LIBPY"
else
  log "WARNING: no libpython3.12.so.1.0 found here (set PYTHON312_LIB): the GPU machine must have its own"
fi
log "compressing the tree ($(du -sh "$T" | cut -f1))"
tar -C "$T" -cf - . | xz -9 -T0 > "$CARRY/triton.tar.xz"

# ---------------------------------------------------------------- 2. the Python packages
PINS=()
for dist in "${DISTS[@]}"; do
  version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist" 2>/dev/null)" \
    || fail "$dist is not installed in $PY's environment: nothing to pin it to"
  PINS+=("$dist==$version")
done
log "wheels for CPython 3.12 (manylinux x86_64): ${PINS[*]}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${PLATFORMS[@]}" -d "$STAGE/wheels" "${PINS[@]}" \
  || fail "pip could not download the wheels (is a package index reachable?)"
"$PY" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --target "$STAGE/site" "$STAGE"/wheels/*.whl \
  || fail "pip could not unpack the wheels for Python 3.12"
rm -rf "$STAGE/site/bin"  # console scripts with this machine's interpreter in their shebang
log "compressing the packages ($(du -sh "$STAGE/site" | cut -f1))"
tar -C "$STAGE/site" -cf - . | xz -9 -T0 > "$CARRY/site.tar.xz"

# ---------------------------------------------------------------- 3. manifest and size
"$PY" - "$CARRY" "$SITE" "$STUBS" "$STAGE/wheels" "${PINS[@]}" <<'EOF'
import hashlib, importlib.metadata as md, json, sys, time
from pathlib import Path

carry, site, stubs, wheels, pins = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), Path(sys.argv[4]), sys.argv[5:]
def sha(path): return hashlib.sha256(path.read_bytes()).hexdigest()
manifest = {
    "created": time.strftime("%Y-%m-%d %H:%M:%S"), "python": "3.12", "stubs": stubs,
    "nvidia_pytriton": md.version("nvidia-pytriton"), "source": site, "pins": pins,
    "wheels": {w.name: {"bytes": w.stat().st_size, "sha256": sha(w)} for w in sorted(wheels.glob("*.whl"))},
    "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha(p)} for p in sorted(carry.glob("*.tar.xz"))},
}
(carry / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF

BYTES="$(du -sb "$CARRY" | cut -f1)"
MIB="$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1048576 }')"
ls -l "$CARRY"
log "carry: $CARRY = $BYTES bytes ($MIB MiB; limit ${LIMIT_MIB} MiB)"
if (( BYTES > LIMIT_MIB * 1048576 )); then
  fail "the carry is $MIB MiB, over ${LIMIT_MIB} MiB (the device machine takes 64 MiB with the working tree)"
fi
log "done: carry it with the working tree and run: bash scripts/gpu_serving_check.sh"
