#!/bin/sh
# Set up ./.venv with fedsim and its dependencies. Safe to run again.
#   ./install.sh         the library and the `fedsim` command
#   ./install.sh --dev   also the test and lint tools
#   ./install.sh --pfl   a second environment, ./.venv-pfl, with Apple's pfl-research for
#                        the pfl side of `python -m experiments.bench_federation`
# torch: an already installed torch is kept. Otherwise a machine with an NVIDIA GPU gets
# PyPI's default (CUDA) build, and any other machine the CPU build, so a laptop never
# downloads gigabytes of CUDA libraries. FEDSIM_TORCH="<pip arguments>" overrides.
set -euf  # -f: no globbing, so "pfl[pytorch]" stays as written
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0
VENV=.venv
extras=""
more=""
case "${1:-}" in
    --dev) extras="[dev]" ;;
    --pfl) VENV=.venv-pfl; more="pfl[pytorch]==0.6.0" ;;  # pfl pins its own dependencies
    "") ;;
    *) echo "install.sh: unknown option ${1}; use --dev, --pfl or nothing" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# installs skip byte-compiling: one parallel pass at the end compiles what can be imported
pip_install() { pip install --no-compile "$@"; }

if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then
    if [ -n "${FEDSIM_TORCH:-}" ]; then
        # shellcheck disable=SC2086
        pip_install $FEDSIM_TORCH
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "install.sh: NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
        pip_install "torch==$TORCH_VERSION"
    else
        echo "install.sh: no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
        pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
# the torch installed above stays: naming its exact version keeps pip from swapping it
torch_pin="torch==$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
# uv (a dependency of Flower's) installs the rest in seconds, where pip takes a minute; pip
# does it where uv cannot, e.g. with only a package index that pip's own settings name
# shellcheck disable=SC2086
if ! { pip_install "uv>=0.4" && "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" \
        -e ".$extras" $more "$torch_pin"; }; then
    echo "install.sh: uv could not install the dependencies (above); pip installs them" >&2
    pip_install -e ".$extras" $more "$torch_pin"
fi
# what pip would have compiled one file at a time, on every core; no package's own tests
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$VENV/bin/python" -m compileall -q -j 0 -x 'site-packages/.+/tests?/' "$site" >/dev/null || :
echo "install.sh: ready: $VENV/bin/fedsim"
