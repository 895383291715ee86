#!/usr/bin/env bash
# Set up (CPU torch first, so no CUDA build is pulled) and run the main job: `lsm main`, i.e. the MQAR
# recall experiment of configs/mqar_gdn_mom.yaml. Extra arguments are OmegaConf overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
lsm main "$@"
