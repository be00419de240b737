#!/usr/bin/env bash
# Installs what the tests need into the active Python environment and runs the suite.
# Used by the README's Quick start and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Headless Chromium for the browser tests (Debian packages; needs root or sudo).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pytest -q "$@"
