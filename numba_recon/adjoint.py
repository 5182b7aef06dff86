"""The adjoint stage: ``grad += 2 sum_b w_b P_b^T r_b`` and filtered back-projection ``(H P)^T y``."""

from __future__ import annotations

from typing import Any

import numpy as np

from numba_recon.backend import Backend
from numba_recon.forward import default_radius_px


def weighted_backproject(backend: Backend, residuals: Any, rotations: Any, weights: Any, radius_px: float,
                         grad_out: Any) -> None:
    """Accumulate the data-term gradient ``grad_out += sum_b 2 weights[b] P_b^T residuals[b]``.

    With the residuals of :func:`numba_recon.forward.forward_residual` this is the gradient of
    ``sum_b weights[b] ||H_b P_b x - T_b^{-1} b_b||^2``.

    Parameters
    ----------
    backend
        From :func:`numba_recon.backend.get_backend`; all arrays are that backend's arrays.
    residuals
        ``(b, N, N)`` ``H^T (H P x - T^{-1} b)``.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    weights
        ``(b,)`` per-particle weights (1 for plain L2).
    radius_px
        Support radius in pixels.
    grad_out
        ``(N, N, N)``, accumulated into.
    """
    backend.weighted_backproject(residuals, rotations, weights, radius_px, grad_out)


def backproject_filtered(backend: Backend, images: Any, rotations: Any, filters: Any | None,
                         radius_px: float | None = None, *, batch_size: int = 256,
                         dtype: Any = np.float32) -> np.ndarray:
    """``(H P)^T y = sum_b P_b^T H_b images[b]``, the adjoint of :func:`numba_recon.forward.model_images`.

    Array arguments may be host arrays or ``backend`` arrays (from its ``to_device``).

    Parameters
    ----------
    backend
        From :func:`numba_recon.backend.get_backend`.
    images
        ``(b, N, N)``.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    filters
        ``(b, N, N)`` real, even filters ``H_b`` (CTFs) in numpy's unshifted ``fft2`` layout, or
        None for the plain back-projection ``P^T y``.
    radius_px
        Support radius in pixels; None means :func:`numba_recon.forward.default_radius_px`.
    batch_size
        Images per kernel call (bounds the device memory used).
    dtype
        Compute type: float32 (both backends) or float64 (CPU only).

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` host array of ``dtype``.
    """
    nb, n = images.shape[0], images.shape[1]
    radius = default_radius_px(n) if radius_px is None else float(radius_px)
    if tuple(rotations.shape) != (nb, 3, 3):
        raise ValueError(f"rotations: expected shape ({nb}, 3, 3), got {tuple(rotations.shape)}")
    if filters is not None and tuple(filters.shape) != (nb, n, n):
        raise ValueError(f"filters: expected shape ({nb}, {n}, {n}), got {tuple(filters.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = backend.zeros((n, n, n), dtype)
    for start in range(0, nb, batch_size):
        stop = min(nb, start + batch_size)
        y = backend.to_device(images[start:stop], dtype)
        if filters is not None:
            hy = backend.zeros((stop - start, n, n), dtype)
            backend.fourier_filter(y, backend.to_device(filters[start:stop], dtype), hy)
            y = hy
        backend.backproject(y, backend.to_device(rotations[start:stop], dtype), radius, out)
    return backend.to_host(out)
