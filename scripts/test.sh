#!/usr/bin/env bash
# Installs what the tests need into the active Python environment and runs the suite.
# Used by the README's Quick start and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# Keep that torch: nothing in the test extra may make pip replace it with another (CUDA) build.
keep_torch="$(mktemp)"
python -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
python -m pip install -q -e ".[test]" -c "$keep_torch"
rm -f "$keep_torch"
# torchvision for the corpus' torchvision-based training script (opacus' MNIST example), the
# release made for this torch (torch 2.N <-> torchvision 0.(N+15)), kept out of the environment:
# beside a CPU torch it breaks `import transformers`. Only that script's runs put it on their path.
tv="$(python -c "import torch; print('0.%d' % (int(torch.__version__.split('.')[1]) + 15))")"
if ! ls -d tests/.deps/torchvision/torchvision-"$tv".*.dist-info >/dev/null 2>&1; then
  rm -rf tests/.deps/torchvision
  python -m pip install -q --no-deps --target tests/.deps/torchvision "torchvision==$tv.*"
fi
# Headless Chromium for the browser tests (Debian packages; needs root or sudo).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pytest -q "$@"
