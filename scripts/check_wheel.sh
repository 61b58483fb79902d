#!/usr/bin/env bash
# Install the repaired wheel (wheelhouse/, from scripts/build_wheels.sh) into a virtual environment where nothing
# runs with a compiler on PATH, and run scripts/wheel_smoke.py there: import, backends(), the compiled pass against
# the float64 reference, a seeded random-backbone detector fitted and run on generated images through the fused
# CPU pass.
# The environment, build/wheel-check-venv, is new in a fresh clone (as in CI). torch 2.14.1 + torchvision 0.29.1,
# 5.5 GB installed, take most of the time (one to two minutes on 2 shared cores), so a rerun keeps them and
# reinstalls only crd-fast; deleting the environment took about as long again. CRD_FAST_WHEEL_VENV moves it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
shopt -s nullglob
wheels=(wheelhouse/crd_fast-*.whl)
if [ "${#wheels[@]}" -ne 1 ]; then
  echo "expected one repaired wheel in wheelhouse/ (bash scripts/build_wheels.sh), found ${#wheels[@]}" >&2
  exit 2
fi
WHEEL="$ROOT/${wheels[0]}"
VENV="${CRD_FAST_WHEEL_VENV:-build/wheel-check-venv}"
mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
WORK="$(mktemp -d)"  # the smoke test's working folder, outside the source tree
trap 'rm -rf "$WORK"' EXIT
if [ ! -x "$VENV/bin/python" ]; then
  start=$SECONDS
  "${PYTHON:-python3}" -m venv "$VENV"
  echo "fresh environment made in $((SECONDS - start)) s: $VENV"
fi

# Every install and run below sees no compiler: PATH holds only the environment, CC/CXX/CUDACXX point nowhere.
without_compilers() {
  env PATH="$VENV/bin" CC=/nonexistent/cc CXX=/nonexistent/c++ CUDACXX=/nonexistent/nvcc "$@"
}
finds() { without_compilers /bin/sh -c "command -v $1" >/dev/null; }
finds python || { echo "the environment's python is not on its PATH" >&2; exit 1; }
for tool in cc c++ gcc g++ clang clang++ nvcc cmake ninja; do
  if finds "$tool"; then
    echo "a compiler or build tool is on PATH: $tool" >&2
    exit 1
  fi
done
echo "--- installing torch 2.14.1 + torchvision 0.29.1, then ${wheels[0]#wheelhouse/} (binary wheels only)"
start=$SECONDS
without_compilers pip install -q "torch==2.14.1" "torchvision==0.29.1"
echo "torch and torchvision installed in $((SECONDS - start)) s"
start=$SECONDS
without_compilers pip uninstall -q -y crd-fast 2>/dev/null || true  # a rerun: the same version would count as installed
without_compilers pip install -q --only-binary=:all: "$WHEEL"
echo "the wheel and its other dependencies installed in $((SECONDS - start)) s"
cd "$WORK"  # away from the source tree, so the installed package is the one imported
start=$SECONDS
CRD_FAST_EXPECT_CUDA_KERNELS="${CRD_FAST_EXPECT_CUDA_KERNELS:-0}" without_compilers python "$ROOT/scripts/wheel_smoke.py"
echo "smoke test ran in $((SECONDS - start)) s"
