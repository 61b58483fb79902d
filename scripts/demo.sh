#!/usr/bin/env bash
# Install crd-fast with what the demo needs (crd-fast[demo], see setup.sh) into .venv and run the built-in demo.
# Extra arguments go to `crd-fast demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec "${CRD_FAST_VENV:-.venv}"/bin/crd-fast demo "$@"
