#!/usr/bin/env bash
# Example SLURM job: 2 nodes x 4 GPUs, one MPI rank per GPU.
#SBATCH --job-name=numba-recon
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=numba-recon-%j.log
set -euo pipefail

# One rank per GPU: with --gpus-per-task=1 each rank sees exactly one device; numba-recon also picks
# its GPU from the node-local rank (COMM_TYPE_SHARED split), so plain --gres also works.
export NUMBA_NUM_THREADS=${SLURM_CPUS_PER_TASK:-4}
# Set to 1 if your MPI is CUDA-aware and you want device buffers passed to Allreduce directly
# (numba-recon probes the library; this forces the answer).
# export NUMBA_RECON_CUDA_AWARE_MPI=1

# --mpi=pmix for Open MPI 4/5 builds, --mpi=pmi2 for MPICH / Intel MPI builds.
# --kill-on-bad-exit ends the whole step when one rank dies (OOM, node loss).
srun --mpi=pmix --kill-on-bad-exit=1 \
    numba-recon run particles.star -o recon_${SLURM_JOB_ID} --backend cuda --batch-size 2048 --epochs 20

# After a crash or a time-out, continue where the last checkpoint left off:
#   srun --mpi=pmix --kill-on-bad-exit=1 numba-recon run --resume recon_<jobid>
