#!/usr/bin/env bash
# The test command (README "Quick start"): set up .venv, then run the CPU test suite.
# GPU tests are marked `gpu` and skipped here; run them on a CUDA machine with `-m gpu`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh || exit 1
.venv/bin/python -m pytest -m "not gpu" --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
