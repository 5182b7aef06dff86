"""The forward stage: ``q = P x``, ``s = H^2 q``, per-particle residuals and losses.

Functions here take a :class:`~numba_recon.backend.Backend` and run its kernels; the engine, the
``project`` command, the benchmarks and the tests all go through them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numba_recon.backend import Backend
from numba_recon.geometry import default_radius_px  # noqa: F401  (the callers' name for it)


def forward_residual(backend: Backend, volume: Any, rotations: Any, filters2: Any, data: Any, data_norm2: Any,
                     radius_px: float, residual_out: Any, loss_out: Any, energy_out: Any = None) -> None:
    """Residuals and losses of one batch of particles (overwrites ``residual_out`` and ``loss_out``).

    ``residual_out[b] = H_b^2 P_b x - data[b]`` and
    ``loss_out[b] = <P_b x, H_b^2 P_b x> - 2 <P_b x, data[b]> + data_norm2[b]``; with
    ``filters2 = H^2``, ``data = H T^{-1} b`` and ``data_norm2 = ||T^{-1} b||^2`` the loss is
    ``||H P x - T^{-1} b||^2`` and the residual ``H^T (H P x - T^{-1} b)``, the input of
    :func:`numba_recon.adjoint.weighted_backproject`.

    Parameters
    ----------
    backend
        From :func:`numba_recon.backend.get_backend`; all arrays are that backend's arrays.
    volume
        ``(N, N, N)``.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    filters2
        ``(b, N, N)`` squared CTFs in numpy's unshifted ``fft2`` layout.
    data
        ``(b, N, N)`` CTF-filtered, re-centred images ``H T^{-1} b``.
    data_norm2
        ``(b,)`` ``||T^{-1} b||^2``.
    radius_px
        Support radius in pixels (see :func:`default_radius_px`).
    residual_out
        ``(b, N, N)``, overwritten.
    loss_out
        ``(b,)``, overwritten.
    energy_out
        ``(b,)`` or None: ``<P_b x, H_b^2 P_b x>``, the model image's energy (what normalises the
        per-particle scores), overwritten.
    """
    backend.forward_residual(volume, rotations, filters2, data, data_norm2, radius_px, residual_out, loss_out,
                             energy_out)


def model_images(backend: Backend, volume: Any, rotations: Any, filters: Any | None, radius_px: float | None = None,
                 *, batch_size: int = 256, dtype: Any = np.float32) -> np.ndarray:
    """Model images ``H_b P_b x`` (CTF-filtered projections) as a host array.

    Array arguments may be host arrays or ``backend`` arrays (from its ``to_device``).

    Parameters
    ----------
    backend
        From :func:`numba_recon.backend.get_backend`.
    volume
        ``(N, N, N)`` indexed ``[z, y, x]``.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A`` (map to image frame).
    filters
        ``(b, N, N)`` real filters ``H_b`` (CTFs) in numpy's unshifted ``fft2`` layout, or None
        for plain projections ``P_b x``.
    radius_px
        Support radius in pixels; None means :func:`default_radius_px`.
    batch_size
        Images computed per kernel call (bounds the device memory used).
    dtype
        Compute type: float32 (both backends) or float64 (CPU only).

    Returns
    -------
    numpy.ndarray
        ``(b, N, N)`` of ``dtype``.
    """
    n = volume.shape[0]
    radius = default_radius_px(n) if radius_px is None else float(radius_px)
    nb = rotations.shape[0]
    if filters is not None and tuple(filters.shape) != (nb, n, n):
        raise ValueError(f"filters: expected shape ({nb}, {n}, {n}), got {tuple(filters.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = np.empty((nb, n, n), dtype=dtype)
    vol = backend.to_device(volume, dtype)
    for start in range(0, nb, batch_size):
        stop = min(nb, start + batch_size)
        rot = backend.to_device(rotations[start:stop], dtype)
        q = backend.zeros((stop - start, n, n), dtype)
        backend.project(vol, rot, radius, q)
        if filters is not None:
            s = backend.zeros((stop - start, n, n), dtype)
            backend.fourier_filter(q, backend.to_device(filters[start:stop], dtype), s)
            q = s
        images[start:stop] = backend.to_host(q)
    return images
