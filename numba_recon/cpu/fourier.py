"""Per-image Fourier filtering and the fused forward/residual/loss call (CPU)."""

from __future__ import annotations

import numpy as np
import scipy.fft
from numba import njit, prange

from numba_recon.cpu import _support
from numba_recon.cpu.project import project
from numba_recon.threads import fft_workers


@njit(parallel=True, fastmath=True, cache=True)
def _even_half(filters):  # pragma: no cover - compiled
    """Columns ``0 .. N // 2`` of the even part ``(H(k) + H(-k)) / 2`` of each filter."""
    nb, n = filters.shape[0], filters.shape[1]
    m = n // 2 + 1
    half = np.empty((nb, n, m), dtype=filters.dtype)
    for b in prange(nb):
        for i in range(n):
            mi = (n - i) % n
            for j in range(m):
                half[b, i, j] = 0.5 * (filters[b, i, j] + filters[b, mi, (n - j) % n])
    return half


def fourier_filter(images: np.ndarray, filters: np.ndarray, out: np.ndarray) -> None:
    """``out[b] = real(ifft2(filters[b] * fft2(images[b])))`` (overwrites ``out``).

    For a real image and a real filter, ``real(ifft2(H F))`` equals ``ifft2(H_e F)`` with ``H_e``
    the even part ``(H(k) + H(-k)) / 2``; ``H_e F`` keeps the Hermitian symmetry of ``F``, so the
    half transforms ``rfft2``/``irfft2`` give the result at half the cost, for odd and even ``N``.
    CTFs are even except on the Nyquist row and column of an even box, where an astigmatic CTF
    differs between ``k`` and its alias ``-k``; taking the even part keeps those lines exact too.

    Parameters
    ----------
    images
        ``(b, N, N)`` float32 or float64, C-contiguous.
    filters
        ``(b, N, N)`` real filters in numpy's unshifted ``fft2`` layout, the images' dtype.
    out
        ``(b, N, N)`` of the images' dtype; may be ``images`` itself.
    """
    _support.check_array("images", images, (None, None, None))
    nb, n = images.shape[0], images.shape[1]
    if images.shape[2] != n:
        raise ValueError(f"images: expected square images (b, N, N), got {images.shape}")
    _support.check_array("filters", filters, (nb, n, n), images.dtype)
    _support.check_array("out", out, (nb, n, n), images.dtype)
    if nb == 0:
        return
    spectrum = scipy.fft.rfft2(images, workers=fft_workers())  # all cores: the batch's transforms are independent
    spectrum *= _even_half(filters)
    out[...] = scipy.fft.irfft2(spectrum, s=(n, n), workers=fft_workers())


@njit(parallel=True, fastmath=True, cache=True)
def _residual_and_loss(model, filtered, data, data_norm2, residual_out, loss_out, energy_out):  # pragma: no cover
    """``residual = filtered - data``; ``loss = <model, filtered> - 2 <model, data> + data_norm2``;
    ``energy = <model, filtered>`` (the model image's energy ``||H P x||^2``).

    Sums in float64, whatever the image dtype: the three terms nearly cancel near the optimum.
    """
    nb, n = model.shape[0], model.shape[1]
    for b in prange(nb):
        qs = 0.0
        qd = 0.0
        for y in range(n):
            for x in range(n):
                q = np.float64(model[b, y, x])
                s = filtered[b, y, x]
                d = data[b, y, x]
                qs += q * np.float64(s)
                qd += q * np.float64(d)
                residual_out[b, y, x] = s - d
        loss_out[b] = qs - 2.0 * qd + np.float64(data_norm2[b])
        energy_out[b] = qs


def forward_residual(volume: np.ndarray, rotations: np.ndarray, filters2: np.ndarray, data: np.ndarray,
                     data_norm2: np.ndarray, radius_px: float, residual_out: np.ndarray,
                     loss_out: np.ndarray, energy_out: np.ndarray | None = None) -> None:
    """Per-particle residuals and losses of the data term (overwrites both outputs).

    With ``q = P x`` and ``s = fourier_filter(q, filters2)``: ``residual_out[b] = s - data[b]`` and
    ``loss_out[b] = <q, s> - 2 <q, data[b]> + data_norm2[b]``. Given ``filters2 = H^2``,
    ``data = H T^{-1} b`` and ``data_norm2 = ||T^{-1} b||^2`` this is ``||H P x - T^{-1} b||^2`` and
    the residual is ``H^T (H P x - T^{-1} b)``.

    Parameters
    ----------
    volume
        ``(N, N, N)`` float32 or float64, C-contiguous.
    rotations
        ``(b, 3, 3)`` RELION matrices ``A``.
    filters2
        ``(b, N, N)`` squared CTFs, unshifted ``fft2`` layout, the volume's dtype.
    data
        ``(b, N, N)`` CTF-filtered, re-centred images, the volume's dtype.
    data_norm2
        ``(b,)`` squared norms of the re-centred images (any float type).
    radius_px
        Support radius in pixels.
    residual_out
        ``(b, N, N)`` of the volume's dtype.
    loss_out
        ``(b,)`` float32 or float64; the losses are summed in float64.
    energy_out
        Optional ``(b,)`` array that receives ``<q, s> = ||H P x||^2``, the model images' energy
        (used to normalise per-particle scores).
    """
    volume = _support.check_volume("volume", volume)
    n = volume.shape[0]
    _support.check_array("data", data, (None, n, n), volume.dtype)
    nb = data.shape[0]
    _support.check_array("residual_out", residual_out, (nb, n, n), volume.dtype)
    _support.check_array("loss_out", loss_out, (nb,))
    norm2 = np.asarray(data_norm2, dtype=np.float64)
    if norm2.shape != (nb,):
        raise ValueError(f"data_norm2: expected shape ({nb},), got {norm2.shape}")
    model = np.zeros((nb, n, n), dtype=volume.dtype)
    project(volume, rotations, radius_px, model)
    fourier_filter(model, filters2, residual_out)
    if energy_out is None:
        energy = np.empty(nb, dtype=np.float64)
    else:
        _support.check_array("energy_out", energy_out, (nb,))
        energy = energy_out
    _residual_and_loss(model, residual_out, data, norm2, residual_out, loss_out, energy)
