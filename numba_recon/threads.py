"""How many CPU threads a process uses: the Numba kernels and the FFTs (scipy.fft ``workers``).

Under MPI every rank on a node would otherwise take all of the node's cores (two ranks with two
threads each on two cores run four times slower per epoch than one process). The default is the
cores this process may run on divided by the ranks on its node; ``--threads`` sets it.
"""

from __future__ import annotations

import os

_fft_workers = -1  # scipy.fft: -1 = all cores


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which batch systems set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(ranks_on_node: int = 1) -> int:
    """The cores available divided by the ranks sharing the node (at least 1)."""
    return max(1, available_cores() // max(1, int(ranks_on_node)))


def set_threads(n: int) -> int:
    """Use ``n`` threads for the Numba kernels (capped at Numba's pool size, ``NUMBA_NUM_THREADS``)
    and the FFTs. Returns the number of kernel threads in effect."""
    global _fft_workers
    import numba

    n = max(1, int(n))
    kernel_threads = min(n, int(numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(kernel_threads)
    _fft_workers = n
    return kernel_threads


def fft_workers() -> int:
    """The ``workers`` argument for scipy.fft calls."""
    return _fft_workers
