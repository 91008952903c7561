#!/usr/bin/env bash
# The README's main command: install, then run the main job end to end on the embedded default —
# Flow-GRPO on the shipped shapes base model (pretrained first if rlgen/assets/flow_shapes_base is
# missing), local Ray cluster, tiny models, CPU. Writes runs/quickstart/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# (no RAY_AUTH_MODE here: the embedded default's local cluster, loopback only, switches Ray's token
# off itself; with ray.address=… the cluster's own authentication applies)
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
python train_rl.py --config configs/quickstart.yaml "$@"
