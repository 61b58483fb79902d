#!/usr/bin/env bash
# Install crd-fast into .venv (see setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd tests  # run against the installed package, not the source tree
exec ../"${CRD_FAST_VENV:-.venv}"/bin/python -m pytest -q -p no:cacheprovider "$@" .
