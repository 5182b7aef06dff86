"""Report whether the MPI in use is CUDA-aware, and check a host-staged Allreduce.

    mpiexec -n 2 python mpi_scripts/check_cuda_aware.py

Prints one JSON line per rank 0: the MPI vendor and library, the CUDA-awareness probe (MPICH's
MPIX_GPU_query_support or Open MPI's MPIX_Query_cuda_support; NUMBA_RECON_CUDA_AWARE_MPI forces
the answer), and whether an Allreduce of device arrays gives the right sum when a GPU is present.
"""

import json

import numpy as np

from numba_recon.reduce import describe_mpi, get_comm, select_device


def main() -> None:
    comm = get_comm()
    report = {"ranks": comm.size, **describe_mpi()}
    device = select_device(comm)
    report["gpu"] = device is not None
    buf = np.full(1024, comm.rank + 1, np.float32)
    comm.allreduce_sum_(buf)
    expected = comm.size * (comm.size + 1) / 2
    report["host_allreduce_ok"] = bool(np.all(buf == expected))
    if device is not None:
        from numba_recon.cuda._target import cuda

        dev = cuda.to_device(np.full(1024, comm.rank + 1, np.float32))
        comm.allreduce_sum_(dev)
        report["device_allreduce_ok"] = bool(np.all(dev.copy_to_host() == expected))
        report["device_allreduce_path"] = "device buffers" if comm.cuda_aware else "host-staged"
    if comm.is_root:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
