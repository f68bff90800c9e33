#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment. Idempotent; used by `make demo` and `make test`.
#
#   bash launch/setup_env.sh [VENV_DIR]      (default .venv)
#
# - Where the system Python already has torch (GPU images ship e.g. torch 2.11 + torchvision 0.26), the venv
#   sees it (--system-site-packages) and the package's dependency *ranges* keep it: nothing replaces it.
# - Otherwise it installs TORCH_SPEC (default torch==2.14.1 torchvision==0.29.1, which install from local disk
#   on the project's CPU machines; elsewhere pip downloads them), from the index TORCH_INDEX when it is set:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu gets PyTorch's CPU wheels, without the CUDA libraries
#   that PyPI's torch brings (GBs a machine without a GPU never uses), where that index is reachable.
# - Then `pip install -e .[EXTRAS]` (default dali,dev). DALI comes from PyPI (nvidia-dali-cuda120, ~424 MB);
#   its CPU pipelines run on machines without a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${1:-${VENV:-.venv}}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dali,dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
TORCH_INDEX=${TORCH_INDEX:-}
stamp=$VENV/.installed-$(cat setup.cfg launch/setup_env.sh | cksum | cut -d' ' -f1)-${EXTRAS//,/_}

[[ -f $stamp ]] && exit 0
if [[ ! -x $VENV/bin/python ]]; then
  if "$PYTHON" -c 'import torch, torchvision' 2>/dev/null; then
    echo "setup_env: using the system torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
  echo "setup_env: installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}"
  # shellcheck disable=SC2086
  "${pip[@]}" install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} $TORCH_SPEC
fi
echo "setup_env: installing fdmobilenet[$EXTRAS] (editable)"
"${pip[@]}" install -e ".[$EXTRAS]" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
rm -f "$VENV"/.installed-* && touch "$stamp"
