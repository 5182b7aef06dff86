"""Particle preparation on the host: what the operator needs from each raw image (numpy, scipy.fft).

For each image ``b`` with background mean ``mu`` (pixels of the background mask), CTF ``C`` and
shift ``s``, :func:`prepare_particles` computes

- ``data = H T^{-1} (b - mu)``: the centred image moved by ``+s`` (Fourier phase ramp) and filtered
  by ``H = C``, or ``H = C^2`` for CTF-premultiplied images (whose model is ``C^2 P x``);
- ``filters2 = H^2`` on the full ``fft2`` grid, the filter the forward step applies;
- ``data_norm2 = ||T^{-1} (b - mu)||^2`` and ``noise_var``, the variance of the centred image's
  background pixels.

The data are filtered with the half-grid (``rfft2``) CTF: columns ``0 .. N//2`` with the Nyquist
column of an even box at ``+1/2`` (:func:`rfft_half`, plus its corner ``(+1/2, -1/2)``), and
``irfft2`` drops the imaginary parts of the DC and Nyquist columns. :mod:`numba_recon.cuda.prepare`
reproduces exactly this operator on the device.
"""

from __future__ import annotations


import numpy as np
import scipy.fft

from numba_recon.contract import CTF_COLUMNS, check_prepare_arguments, ctf_parameters  # noqa: F401
from numba_recon.ctf import ctf_images
from numba_recon.threads import fft_workers

def shift_phase(box_size: int, shifts_px: np.ndarray) -> np.ndarray:
    """Fourier phase ramps that move image content by ``+shift``: ``exp(-2 pi i k.s / N)``.

    ``shifts_px (b, 2)`` as ``(x, y)``; returns ``(b, N, N//2+1)`` complex64 in ``rfft2`` layout.
    """
    n = box_size
    ky = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    s = np.asarray(shifts_px, dtype=np.float64)
    # the ramp is separable: two small exponentials per image and an outer product
    ramp_x = np.exp(-2j * np.pi / n * kx[None, :] * s[:, 0, None])
    ramp_y = np.exp(-2j * np.pi / n * ky[None, :] * s[:, 1, None])
    return (ramp_y[:, :, None] * ramp_x[:, None, :]).astype(np.complex64)


def rfft_half(full: np.ndarray) -> np.ndarray:
    """The ``rfft2`` layout ``(b, N, N//2 + 1)`` of filters given on the full ``fft2`` grid ``(b, N, N)``.

    Columns ``0 .. N//2`` are shared, except the Nyquist column of an even box: ``rfftfreq`` puts
    it at ``+1/2`` and ``fftfreq`` at ``-1/2``, and ``H(+1/2, k_y) = H(-1/2, -k_y)`` for the CTF
    (even in ``k``), so that column is read from the mirrored rows. Only its corner
    ``(+1/2, -1/2)`` has no mirror on the full grid; the caller sets it. Evaluating the CTF once on
    the full grid halves the cost of preparing a particle.
    """
    n = full.shape[-1]
    half = np.array(full[..., : n // 2 + 1])
    if n % 2 == 0:
        mirror = (-np.arange(n)) % n
        half[..., :, n // 2] = full[..., mirror, n // 2]
    return half


def background_means(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each image over the background pixels ``mask (N, N)``: ``images (b, N, N)`` -> ``(b,)`` float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        return images[:, mask].mean(axis=1, dtype=np.float64)


def prepare_particles(images: np.ndarray, ctf_params: np.ndarray, shifts_px: np.ndarray, premultiplied: np.ndarray,
                      pixel_size_angstrom: float, background_mask: np.ndarray, data_out: np.ndarray,
                      filters2_out: np.ndarray, data_norm2_out: np.ndarray, noise_var_out: np.ndarray) -> None:
    """Prepare ``b`` raw particle images for the operator (overwrites the four outputs).

    Every step is per image, so an image comes out the same in any batch. Images whose pixels
    overflow give non-finite outputs, without a warning (they are refused before, by the survey).

    Parameters
    ----------
    images
        ``(b, N, N)`` float32, C-contiguous: the raw pixels (not modified).
    ctf_params
        ``(b, 9)`` float64, columns :data:`CTF_COLUMNS` (``defocus_u_angstrom``,
        ``defocus_v_angstrom``, ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``,
        ``amplitude_contrast``, ``phase_shift_deg``, ``bfactor_angstrom2``, ``scale``); see
        :func:`ctf_parameters`.
    shifts_px
        ``(b, 2)`` float64 ``(x, y)`` in pixels, RELION's origin: the image is moved by ``+shift``.
    premultiplied
        ``(b,)`` bool or uint8, non-zero where the image is already multiplied by its CTF
        (``H = C^2``).
    pixel_size_angstrom
        Pixel size of the images.
    background_mask
        ``(N, N)`` bool or uint8, non-zero on the background pixels (outside the particle disc)
        whose mean is subtracted and whose variance is ``noise_var``.
    data_out
        ``(b, N, N)`` float32: ``H T^{-1} (b - mean)``.
    filters2_out
        ``(b, N, N)`` float32: ``H^2`` in numpy's unshifted ``fft2`` layout.
    data_norm2_out
        ``(b,)`` float32: ``||T^{-1} (b - mean)||^2``, summed in float64.
    noise_var_out
        ``(b,)`` float32: variance (float64 sums) of the centred image's background pixels, not
        floored (a constant background gives 0).
    """
    nb, box = check_prepare_arguments(images, ctf_params, shifts_px, premultiplied, pixel_size_angstrom,
                                      background_mask, data_out, filters2_out, data_norm2_out, noise_var_out)
    if nb == 0:
        return
    mask = np.asarray(background_mask, dtype=bool)
    pixel = float(pixel_size_angstrom)
    params = {k: ctf_params[:, i] for i, k in enumerate(CTF_COLUMNS)}
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing images are refused by the survey
        images = images - background_means(images, mask)[:, None, None].astype(np.float32)
    ctf_full = ctf_images(params, box, pixel, half=False)
    ctf_half = rfft_half(ctf_full)
    if box % 2 == 0:  # (+1/2, -1/2) is the one half-grid frequency the full grid lacks
        ctf_half[:, box // 2, box // 2] = ctf_images(params, 2, pixel, half=True)[:, 1, 1]
    premult = np.asarray(premultiplied).astype(bool)
    h_half = np.where(premult[:, None, None], ctf_half * ctf_half, ctf_half)
    h_full = np.where(premult[:, None, None], ctf_full * ctf_full, ctf_full)
    spectrum = scipy.fft.rfft2(images, workers=fft_workers()) * shift_phase(box, shifts_px)
    shifted = scipy.fft.irfft2(spectrum, s=(box, box), workers=fft_workers())
    data_out[:] = scipy.fft.irfft2(spectrum * h_half, s=(box, box), workers=fft_workers()).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing images are refused by the caller
        data_norm2_out[:] = np.einsum("bij,bij->b", shifted, shifted, dtype=np.float64).astype(np.float32)
    bg = images[:, mask]
    with np.errstate(over="ignore", invalid="ignore"):
        noise_var_out[:] = bg.var(axis=1, dtype=np.float64).astype(np.float32)
    filters2_out[:] = (h_full * h_full).astype(np.float32, copy=False)
