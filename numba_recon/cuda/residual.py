"""Forward model, residuals and per-particle losses of a batch on the GPU."""

from __future__ import annotations

from typing import Any

from numba_recon.cuda._checks import device_f32
from numba_recon.cuda.elementwise import REDUCE_THREADS, _residual_loss_kernel
from numba_recon.cuda.fourier import MAX_BATCH_BLOCKS, fourier_filter
from numba_recon.cuda.memory import fill, scratch
from numba_recon.cuda.project import DEFAULT_THREADS_PER_BLOCK, project


def forward_residual(volume: Any, rotations: Any, filters2: Any, data: Any, data_norm2: Any, radius_px: float,
                     residual_out: Any, loss_out: Any, energy_out: Any = None, *,
                     threads_per_block: int = DEFAULT_THREADS_PER_BLOCK) -> None:
    """Residuals and losses of a batch: ``q = P x``, ``s = fourier_filter(q, filters2)``.

    Sets ``residual_out[b] = s[b] - data[b]`` and
    ``loss_out[b] = <q_b, s_b> - 2 <q_b, data[b]> + data_norm2[b]`` (both overwritten; the
    dot products are summed in float64). With ``filters2 = H^2``, ``data = H T^{-1} b`` and
    ``data_norm2 = ||T^{-1} b||^2`` the loss is ``||H P x - T^{-1} b||^2`` and the residual is
    ``H^T (H P x - T^{-1} b)``. Asynchronous.

    Parameters
    ----------
    volume
        ``(N, N, N)`` float32 device array ``x``.
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    filters2
        ``(b, N, N)`` float32 device array, real, numpy's unshifted ``fft2`` layout.
    data
        ``(b, N, N)`` float32 device array.
    data_norm2
        ``(b,)`` float32 device array.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    residual_out
        ``(b, N, N)`` float32 device array (overwritten).
    loss_out
        ``(b,)`` float32 device array (overwritten).
    energy_out
        Optional ``(b,)`` float32 device array that receives ``<q, s> = ||H P x||^2``, the model
        images' energy.
    threads_per_block
        Block size of the projection (see :func:`~numba_recon.cuda.project`).
    """
    device_f32("volume", volume, (None, None, None))
    n = volume.shape[0]
    device_f32("volume", volume, (n, n, n))
    device_f32("rotations", rotations, (None, 3, 3))
    nb = rotations.shape[0]
    for name, arr in (("filters2", filters2), ("data", data), ("residual_out", residual_out)):
        device_f32(name, arr, (nb, n, n))
    device_f32("data_norm2", data_norm2, (nb,))
    device_f32("loss_out", loss_out, (nb,))
    if energy_out is None:
        energy_out = scratch("forward_residual.energy", (nb,))
    device_f32("energy_out", energy_out, (nb,))
    if nb == 0:
        return
    q = scratch("forward_residual.q", (nb, n, n))
    fill(q, 0.0)
    project(volume, rotations, radius_px, q, threads_per_block=threads_per_block)
    fourier_filter(q, filters2, residual_out)
    _residual_loss_kernel[min(nb, MAX_BATCH_BLOCKS), REDUCE_THREADS](q, residual_out, data, data_norm2, loss_out,
                                                                     energy_out)
