#!/usr/bin/env bash
# Run the MPI tests: each launches `mpiexec -n 2` jobs (the engine at 1 and 2 ranks, the gradient
# Allreduce, abort-on-failure). Needs an MPI: `pip install 'numba-recon[mpich]'` or a site MPI.
#   mpi_scripts/run_mpi_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mpiexec >/dev/null || { echo "mpiexec not found: pip install 'numba-recon[mpich]' or load an MPI module" >&2; exit 2; }
python -m pytest -m mpi tests "$@"
