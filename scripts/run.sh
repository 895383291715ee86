#!/usr/bin/env bash
# Set up (CPU torch first, so no CUDA build is pulled) and run the main job: `lsm main`, i.e. the MQAR
# recall sweep of configs/mqar_gdn_mom.yaml (single memory vs MoM, 3 seeds each, two worker processes). Extra arguments
# are OmegaConf overrides or sweep flags (--rerun, --shard i/n, --merge); a killed run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e .
lsm main "$@"
