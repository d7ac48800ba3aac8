#!/bin/sh
# Set up ./.venv with fedsim and its dependencies. Safe to run again.
#   ./install.sh         the library and the `fedsim` command
#   ./install.sh --dev   also the test and lint tools
# torch: an already installed torch is kept. Otherwise a machine with an NVIDIA GPU gets
# PyPI's default (CUDA) build, and any other machine the CPU build, so a laptop never
# downloads gigabytes of CUDA libraries. FEDSIM_TORCH="<pip arguments>" overrides.
set -eu
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${FEDSIM_TORCH:-}" ]; then
        # shellcheck disable=SC2086
        pip install $FEDSIM_TORCH
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "install.sh: NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
        pip install "torch==$TORCH_VERSION"
    else
        echo "install.sh: no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
        pip install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip install -e ".$extras"
echo "install.sh: ready: .venv/bin/fedsim"
