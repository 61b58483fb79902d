#!/usr/bin/env bash
# Install crd-fast with its dev extras into .venv (see setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# A build that silently lost its kernels must fail the tests, not skip them.
export CRD_FAST_EXPECT_NATIVE=1
# setup.sh installed every optional extra: their tests must run, not skip (tests/test_extras.py).
export CRD_FAST_EXPECT_EXTRAS=1
if [ "${CRD_FAST_CPU_ONLY:-0}" = "1" ] || [ "${CRD_FAST_CUDA:-}" = "OFF" ]; then
  export CRD_FAST_EXPECT_CUDA_KERNELS=0
elif command -v nvcc >/dev/null 2>&1 || [ -n "${CUDACXX:-}" ]; then
  export CRD_FAST_EXPECT_CUDA_KERNELS=1
fi
cd tests  # run against the installed package, not the source tree
exec ../"${CRD_FAST_VENV:-.venv}"/bin/python -m pytest -q -p no:cacheprovider "$@" .
