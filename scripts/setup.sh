#!/usr/bin/env bash
# Create .venv with every pinned package the project needs (idempotent, a few minutes the first
# time). numpy stays 1.26.4 (the tritonserver Python stub is built for numpy 1); py3langid 0.3.0
# is installed with --no-deps because it declares numpy>=2 yet runs on 1.26 (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.acestep-installed
want=$(cat pyproject.toml client/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and alone: the CPU wheel of this exact version is the one available offline.
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  python -m pip install -q --disable-pip-version-check -e ./client -e ".[export,serve,download,ui,dev]"
  python -m pip install -q --disable-pip-version-check --no-deps "py3langid==0.3.0"
  echo "$want" > "$stamp"
fi
python -m acestep_triton.serving.server prepare >/dev/null
# Headless Chromium for the front end's browser test (Playwright drives the system browser).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
