#!/usr/bin/env bash
# Install the repaired wheel (wheelhouse/, from scripts/build_wheels.sh) into a fresh virtual environment that has
# no compiler on PATH, and run scripts/wheel_smoke.py there: import, backends(), the compiled pass against the
# float64 reference, a seeded random-backbone detector fitted and run on generated images through the fused CPU pass.
# torch 2.14.1 + torchvision 0.29.1 come from the package registry (5.5 GB installed, about a minute); the
# environment is made in a temporary folder and removed at exit.
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
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"${PYTHON:-python3}" -m venv "$WORK/venv"

# Every install and run below sees no compiler: PATH holds only the new environment, CC/CXX/CUDACXX point nowhere.
without_compilers() {
  env PATH="$WORK/venv/bin" CC=/nonexistent/cc CXX=/nonexistent/c++ CUDACXX=/nonexistent/nvcc "$@"
}
finds() { without_compilers /bin/sh -c "command -v $1" >/dev/null; }
finds python || { echo "the new environment's python is not on its PATH" >&2; exit 1; }
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
without_compilers pip install -q --only-binary=:all: "$WHEEL"
cd "$WORK"  # away from the source tree, so the installed package is the one imported
CRD_FAST_EXPECT_CUDA_KERNELS="${CRD_FAST_EXPECT_CUDA_KERNELS:-0}" without_compilers python "$ROOT/scripts/wheel_smoke.py"
