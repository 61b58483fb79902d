#!/usr/bin/env bash
# Install crd-fast into .venv (see setup.sh) and run the built-in demo. Extra arguments go to `crd-fast demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CRD_FAST_VENV:-.venv}"/bin/crd-fast demo "$@"
