"""CPU kernels of the forward model and its exact adjoint (Numba ``parallel=True``).

Exports the kernel contract of ``docs/architecture.md`` with the same names and signatures as
:mod:`numba_recon.cuda`. Arrays are host numpy arrays, float32 (float64 is accepted too, for
tight adjoint tests), C-contiguous. Every kernel is deterministic: results are bitwise identical
for any number of threads.
"""

from __future__ import annotations

from numba_recon.cpu.backproject import backproject, weighted_backproject
from numba_recon.cpu.fourier import forward_residual, fourier_filter
from numba_recon.cpu.insert import insert_weights, weight_filters
from numba_recon.cpu.memory import synchronize, to_device, to_host, zeros
from numba_recon.cpu.prepare import prepare_particles
from numba_recon.cpu.project import project
from numba_recon.cpu.step import adam_update, copy_into, fill, scale_gradient


def is_available() -> bool:
    """The CPU backend runs wherever numba does."""
    return True


__all__ = [
    "adam_update",
    "backproject",
    "copy_into",
    "fill",
    "forward_residual",
    "fourier_filter",
    "insert_weights",
    "is_available",
    "prepare_particles",
    "project",
    "scale_gradient",
    "synchronize",
    "to_device",
    "to_host",
    "weighted_backproject",
    "weight_filters",
    "zeros",
]
