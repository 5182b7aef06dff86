#!/usr/bin/env bash
# Create a separate virtual environment with cryoDRGN for the peer benchmark
# (benchmarks/peers.py).  cryoDRGN is NOT a dependency of numba-recon; it is
# only used here as an independent reference reconstruction
# (`cryodrgn backproject_voxel`, single-pass Fourier insertion).
#
# Usage:  bash benchmarks/peer_env.sh            # creates benchmarks/.venv-cryodrgn
#         PYTHON=python3.11 bash benchmarks/peer_env.sh
#
# torch is pinned to 2.13.0 because a CPU build of that version is available
# locally; an unpinned `pip install torch` would pull a multi-GB CUDA build.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-cryodrgn}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
# 1) torch first (pinned: CPU build)
"$VENV/bin/python" -m pip install "torch==$TORCH_VERSION"
# 2) cryoDRGN, with torch held at the pinned version
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -c "$VENV/constraints.txt" "${CRYODRGN_SPEC:-cryodrgn}"

"$VENV/bin/cryodrgn" backproject_voxel --help > /dev/null
"$VENV/bin/python" -c "import torch, cryodrgn; print('torch', torch.__version__, 'cryodrgn', cryodrgn.__version__)"
echo "OK: cryoDRGN environment at $VENV"
