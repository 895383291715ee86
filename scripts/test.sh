#!/usr/bin/env bash
# Set up (CPU torch first, so no CUDA build is pulled), lint (ruff, configured in pyproject.toml), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m ruff check .
python3 -m pytest "$@"
