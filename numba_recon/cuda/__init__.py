"""CUDA twin of the forward model (numba-cuda kernels).

Exports the kernel contract of ``docs/architecture.md`` for device arrays: ``project``,
``backproject``, ``fourier_filter``, ``forward_residual``, ``weighted_backproject``, ``insert_weights``,
``weight_filters``, the
optimiser step ``scale_gradient`` and ``adam_update``, the particle preparation
``prepare_particles``, and the memory helpers ``to_device``, ``to_host``,
``zeros``, ``fill``, ``copy_into``, ``synchronize``; plus ``is_available`` and
``describe``. Launchers are asynchronous: call :func:`synchronize` (or copy to the host) before
reading results on the host. With ``NUMBA_ENABLE_CUDASIM=1`` the same code runs in Numba's CUDA
simulator. Design notes: ``docs/cuda.md``.
"""

from __future__ import annotations

from numba_recon.cuda._target import describe, is_available
from numba_recon.cuda.backproject import backproject, weighted_backproject
from numba_recon.cuda.fourier import fourier_filter
from numba_recon.cuda.insert import insert_weights, weight_filters
from numba_recon.cuda.memory import synchronize, to_device, to_host, zeros
from numba_recon.cuda.prepare import prepare_particles
from numba_recon.cuda.project import project
from numba_recon.cuda.residual import forward_residual
from numba_recon.cuda.step import adam_update, copy_into, fill, scale_gradient

__all__ = [
    "project",
    "backproject",
    "fourier_filter",
    "insert_weights",
    "forward_residual",
    "weighted_backproject",
    "weight_filters",
    "scale_gradient",
    "adam_update",
    "prepare_particles",
    "to_device",
    "to_host",
    "zeros",
    "fill",
    "copy_into",
    "synchronize",
    "is_available",
    "describe",
]
