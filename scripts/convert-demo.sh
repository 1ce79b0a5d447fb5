#!/usr/bin/env bash
# The main job (README "Quick start"): set up .venv, then convert the embedded SmolLM2-135M-Instruct
# teacher into a HypeNet hybrid on the bundled text and compare the two. Extra arguments go to
# `hybridize convert` (see `hybridize convert --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/hybridize convert "$@"
