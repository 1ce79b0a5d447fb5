#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install hybridize into it.
# CPU machines get the CPU build of torch 2.13.0; set HYBRIDIZE_TORCH to pin another spec
# (e.g. HYBRIDIZE_TORCH="torch" on a CUDA machine), or HYBRIDIZE_PYTHON to use another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${HYBRIDIZE_PYTHON:-python3}"
echo "hybridize: setting up .venv (first time: a few minutes; torch, transformers and the test tools)" >&2
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # torch 2.13.0: a CPU wheel lies on the CPU machines' disk; an unpinned torch would pull a CUDA build.
  .venv/bin/python -m pip install -q "${HYBRIDIZE_TORCH:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
echo "hybridize: .venv ready" >&2
