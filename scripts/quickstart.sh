#!/usr/bin/env bash
# The README's main command: install, pretrain the base shapes model, evaluate it on the held-out
# prompts. Re-running resumes/reuses the run (run.resume=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m rlgen.pretrain --config configs/pretrain/flow_shapes.yaml run.name=quickstart_base run.resume=auto "$@"
python -m rlgen.evaluate --checkpoint runs/quickstart_base --benchmark shapes \
  --out runs/quickstart_base/eval_shapes.json
