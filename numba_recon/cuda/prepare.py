"""Particle preparation on the GPU: the operator's per-particle data from raw images and parameters.

CUDA twin of :func:`numba_recon.cpu.prepare.prepare_particles` (same arguments, device arrays).
Three steps per batch, all asynchronous on the default stream:

1. ``_background_kernel`` (one block per image): the background mean (float64 block reduction),
   its float32 rounding subtracted from every pixel (written to ``data_out``, used as the work
   image), and the variance of the centred background pixels (float64 sums) into ``noise_var_out``.
2. The 2-D DFT ``F = W X W`` of the centred image: stages 1 and 2 of the matrix-product DFT of
   :mod:`numba_recon.cuda.fourier`, without a filter.
3. ``_spectrum_kernel`` (one block per image): at each frequency, the CTF and the phase ramp of the
   shift, ``F <- M F`` with the complex multiplier ``M`` below, ``filters2_out = H^2`` and
   ``data_norm2_out`` by Parseval; then stages 3 and 4 give ``data_out = real(ifft2(M F))``.

**The multiplier.** The host moves and filters an image as ``irfft2(rfft2(x) * R * H_half)`` with
the ramp ``R = exp(-2 pi i k.s / N)`` and the CTF on the half grid (``kx = 0 .. N//2``, the
Nyquist column of an even box at ``+1/2``); ``irfft2`` reads the half spectrum as a Hermitian one,
which takes the real parts of its DC and Nyquist columns. On the full grid that is ``real(ifft2(F M))``
with ``M(k) = g(k)``, ``g(k) = R(k) H(k)`` evaluated at the signed frequency ``k`` (``fftfreq``), except
on the Nyquist lines of an even box (``h = N/2``; the row and column at ``-h``), where the half grid
sees a frequency and its alias:

- row ``-h``, ``0 < |kx| < h``: ``g(kx, -h)`` for ``kx > 0`` and ``g(kx, +h)`` for ``kx < 0``;
- row ``-h``, ``kx = 0``: ``(g(0, -h) + g(0, +h)) / 2``;
- column ``-h``: ``(g(+h, ky) + g(-h, ky)) / 2``, and ``(g(+h, -h) + g(-h, +h)) / 2`` at the corner.

With a non-integer shift the ramp is not even on those lines, so the shift is not a product of two
1-D real circulant matrices there; applying it in Fourier space, in the same pass as the CTF,
reproduces the host exactly and costs no matrix products beyond the four DFT stages.
``data_norm2 = ||real(ifft2(F R_eff))||^2 = sum |F|^2 |R_eff|^2 / N^2`` with ``R_eff`` the same
construction with ``H = 1`` (``|R_eff| = 1`` off the Nyquist lines).

**Precision.** The CTF parameters and shifts are float64 device arrays: the CTF phase ``gamma``
reaches ~3e3 rad at Nyquist (5 um defocus, 0.5 A pixels), where float32 would leave errors of
~1e-4 rad. ``gamma`` and the ramp phase are formed and reduced to ``[-pi, pi]`` in float64 (about
30 float64 operations per frequency); ``sin``, ``cos`` and the B-factor ``exp`` are float32
(accurate libdevice functions, no fastmath), so the CTF agrees with the host's float64 value
rounded to float32 to a few float32 roundings. The DFTs are the float32 matrix products of
:mod:`numba_recon.cuda.fourier`; means, variances and norms are summed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from numba_recon.contract import check_prepare_arguments
from numba_recon.cuda._target import cuda, is_device_array
from numba_recon.cuda.elementwise import block_sum, block_sum2
from numba_recon.cuda.fourier import MAX_BATCH_BLOCKS, _device_matrices, _stage
from numba_recon.cuda.memory import scratch

#: Threads per block of the per-image kernels (a power of two, at most 1024).
PREP_THREADS = 128

_TWO_PI = 2.0 * math.pi
_INV_TWO_PI = 1.0 / (2.0 * math.pi)
_DEG = math.pi / 180.0


@cuda.jit(cache=True)
def _background_kernel(images, mask, centred_out, noise_var_out):
    """Per image (one block each, grid-stride): ``centred_out[b] = images[b] - float32(mean)`` with
    ``mean`` the float64 mean over ``mask != 0``, and ``noise_var_out[b]`` the float64 variance of
    the centred background pixels, as float32.

    ``images``, ``centred_out (b, N, N)`` float32, ``mask (N, N)`` uint8, ``noise_var_out (b,)``
    float32. Launch with ``PREP_THREADS`` threads and ``min(b, MAX_BATCH_BLOCKS)`` blocks.
    """
    s1 = cuda.shared.array(PREP_THREADS, np.float64)
    s2 = cuda.shared.array(PREP_THREADS, np.float64)
    cnt = cuda.shared.array(PREP_THREADS, np.float64)
    tid = cuda.threadIdx.x
    n = images.shape[2]
    n_pix = images.shape[1] * n
    for b in range(cuda.blockIdx.x, images.shape[0], cuda.gridDim.x):
        acc = np.float64(0.0)
        count = np.float64(0.0)
        for p in range(tid, n_pix, PREP_THREADS):
            y = p // n
            x = p - y * n
            if mask[y, x] != 0:
                acc += np.float64(images[b, y, x])
                count += 1.0
        s1[tid] = acc
        cnt[tid] = count
        cuda.syncthreads()
        block_sum2(s1, cnt, tid, PREP_THREADS)
        total = cnt[0]
        # the host subtracts the mean rounded to float32, in float32
        mean32 = np.float32(s1[0] / total)
        cuda.syncthreads()  # every thread has read s1[0] and cnt[0] before they are reused
        acc = np.float64(0.0)
        acc2 = np.float64(0.0)
        for p in range(tid, n_pix, PREP_THREADS):
            y = p // n
            x = p - y * n
            v = images[b, y, x] - mean32
            centred_out[b, y, x] = v
            if mask[y, x] != 0:
                d = np.float64(v)
                acc += d
                acc2 += d * d
        s1[tid] = acc
        s2[tid] = acc2
        cuda.syncthreads()
        block_sum2(s1, s2, tid, PREP_THREADS)
        if tid == 0:
            # the centred mean is a float32 rounding of zero, so E[v^2] - E[v]^2 loses nothing in float64
            m = s1[0] / total
            noise_var_out[b] = np.float32(s2[0] / total - m * m)
        cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _ctf_at(kx, ky, inv_np, k1, axx, axy, ayy, k2, k35, k4, scale, premult):
    """The filter ``H`` (the CTF, squared when ``premult``) at integer frequency ``(kx, ky)``, float32.

    ``inv_np = 1 / (N * pixel_size)``; the phase is formed and reduced in float64, sin and exp are
    float32.
    """
    x = np.float64(kx) * inv_np
    y = np.float64(ky) * inv_np
    u2 = x * x + y * y
    gamma = k1 * (axx * x * x + 2.0 * axy * x * y + ayy * y * y) + k2 * u2 * u2 - k35
    gamma -= _TWO_PI * math.floor(gamma * _INV_TWO_PI + 0.5)
    s = math.sin(np.float32(gamma))
    e = math.exp(np.float32(k4 * u2))
    c = np.float32(scale * (-np.float64(s)) * np.float64(e))
    if premult != 0:
        c = c * c
    return c


@cuda.jit(device=True, inline=True)
def _ramp_at(kx, ky, sx, sy, inv_n):
    """``exp(-2 pi i (kx sx + ky sy) / N)`` as float32 ``(cos, sin)``; the phase is reduced in float64."""
    f = (np.float64(kx) * sx + np.float64(ky) * sy) * inv_n
    f -= math.floor(f + 0.5)
    phi = np.float32(-_TWO_PI * f)
    return math.cos(phi), math.sin(phi)


@cuda.jit(cache=True)
def _spectrum_kernel(spec, ctf_params, shifts_px, premultiplied, pixel_size_angstrom, filters2_out,
                     data_norm2_out):
    """Per image (one block each, grid-stride): ``spec[b] <- M * spec[b]``, ``filters2_out[b] = H^2``
    and ``data_norm2_out[b] = sum |F|^2 |R_eff|^2 / N^2`` (see the module docstring).

    ``spec (b, 2N, N)`` float32 holds ``[Re F; Im F]`` with ``F[ky, kx]`` in ``fft2`` layout (rows
    ``0 .. N-1`` real parts, ``N .. 2N-1`` imaginary parts); ``ctf_params (b, 9)`` and
    ``shifts_px (b, 2)`` float64; ``premultiplied (b,)`` uint8; ``filters2_out (b, N, N)`` and
    ``data_norm2_out (b,)`` float32. Launch with ``PREP_THREADS`` threads and
    ``min(b, MAX_BATCH_BLOCKS)`` blocks.
    """
    consts = cuda.shared.array(8, np.float64)
    part = cuda.shared.array(PREP_THREADS, np.float64)
    tid = cuda.threadIdx.x
    n = spec.shape[2]
    half = n // 2
    even = n % 2 == 0
    pos_max = (n - 1) // 2  # largest non-negative fftfreq index
    inv_n = 1.0 / n
    inv_np = inv_n / pixel_size_angstrom
    for b in range(cuda.blockIdx.x, spec.shape[0], cuda.gridDim.x):
        if tid == 0:
            # the per-particle constants of ctf.ctf_value, in float64
            volts = ctf_params[b, 3] * 1e3
            lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
            q0 = ctf_params[b, 5]
            angle = ctf_params[b, 2] * _DEG
            ca = math.cos(angle)
            sa = math.sin(angle)
            du = -ctf_params[b, 0]
            dv = -ctf_params[b, 1]
            consts[0] = math.pi * lam
            consts[1] = du * ca * ca + dv * sa * sa
            consts[2] = (du - dv) * ca * sa
            consts[3] = du * sa * sa + dv * ca * ca
            consts[4] = math.pi / 2.0 * (ctf_params[b, 4] * 1e7) * lam * lam * lam
            consts[5] = ctf_params[b, 6] * _DEG + math.atan(q0 / math.sqrt(1.0 - q0 * q0))
            consts[6] = -ctf_params[b, 7] / 4.0
            consts[7] = ctf_params[b, 8]
        cuda.syncthreads()
        k1 = consts[0]
        axx = consts[1]
        axy = consts[2]
        ayy = consts[3]
        k2 = consts[4]
        k35 = consts[5]
        k4 = consts[6]
        scale = consts[7]
        sx = shifts_px[b, 0]
        sy = shifts_px[b, 1]
        pm = premultiplied[b]
        acc = np.float64(0.0)
        for p in range(tid, n * n, PREP_THREADS):
            iy = p // n
            ix = p - iy * n
            ky = iy if iy <= pos_max else iy - n
            kx = ix if ix <= pos_max else ix - n
            h = _ctf_at(kx, ky, inv_np, k1, axx, axy, ayy, k2, k35, k4, scale, pm)
            filters2_out[b, iy, ix] = h * h
            if even and (kx == -half or ky == -half):
                # a Nyquist line: the mean of g at the two frequencies the half grid reads here
                ax = kx
                ay = ky
                bx = kx
                by = ky
                if kx == -half:
                    ax = half
                    if ky == -half:
                        by = half
                elif kx < 0:
                    ay = half
                    by = half
                elif kx == 0:
                    by = half
                ha = _ctf_at(ax, ay, inv_np, k1, axx, axy, ayy, k2, k35, k4, scale, pm)
                hb = _ctf_at(bx, by, inv_np, k1, axx, axy, ayy, k2, k35, k4, scale, pm)
                ca_, sa_ = _ramp_at(ax, ay, sx, sy, inv_n)
                cb_, sb_ = _ramp_at(bx, by, sx, sy, inv_n)
                mr = np.float32(0.5) * (ca_ * ha + cb_ * hb)
                mi = np.float32(0.5) * (sa_ * ha + sb_ * hb)
                er = np.float32(0.5) * (ca_ + cb_)
                ei = np.float32(0.5) * (sa_ + sb_)
                ramp2 = np.float64(er * er + ei * ei)
            else:
                cr, sr = _ramp_at(kx, ky, sx, sy, inv_n)
                mr = cr * h
                mi = sr * h
                ramp2 = 1.0
            fr = spec[b, iy, ix]
            fi = spec[b, n + iy, ix]
            spec[b, iy, ix] = fr * mr - fi * mi
            spec[b, n + iy, ix] = fr * mi + fi * mr
            acc += (np.float64(fr) * np.float64(fr) + np.float64(fi) * np.float64(fi)) * ramp2
        part[tid] = acc
        cuda.syncthreads()
        block_sum(part, tid, PREP_THREADS)
        if tid == 0:
            data_norm2_out[b] = np.float32(part[0] * inv_n * inv_n)
        cuda.syncthreads()  # part[0] and consts are read before the next image overwrites them


def _as_uint8(a: Any) -> Any:
    """A bool device array viewed as uint8 (same bytes, 0 or 1); uint8 arrays as they are."""
    return a.view(np.uint8) if np.dtype(a.dtype) == np.bool_ else a


def prepare_particles(images: Any, ctf_params: Any, shifts_px: Any, premultiplied: Any, pixel_size_angstrom: float,
                      background_mask: Any, data_out: Any, filters2_out: Any, data_norm2_out: Any,
                      noise_var_out: Any) -> None:
    """Prepare ``b`` raw particle images on the device (overwrites the four outputs; asynchronous).

    Same arguments and results as :func:`numba_recon.cpu.prepare.prepare_particles`, as C-contiguous
    device arrays: ``images (b, N, N)`` float32 (not modified), ``ctf_params (b, 9)`` float64
    (columns :data:`~numba_recon.contract.CTF_COLUMNS`), ``shifts_px (b, 2)`` float64 ``(x, y)``,
    ``premultiplied (b,)`` bool or uint8, ``background_mask (N, N)`` bool or uint8, and the float32
    outputs ``data_out``, ``filters2_out (b, N, N)``, ``data_norm2_out``, ``noise_var_out (b,)``.
    ``pixel_size_angstrom`` is a host number. Copy the float64 and bool arrays with
    ``to_device(a, dtype=None)`` (its default converts to float32). Work arrays come from
    :func:`numba_recon.cuda.memory.scratch` (two ``(b, 2N, N)`` float32 buffers, reused).

    Results agree with the CPU's to float32 rounding (see the module docstring); ``noise_var`` is
    not floored.
    """
    arrays = {"images": images, "ctf_params": ctf_params, "shifts_px": shifts_px, "premultiplied": premultiplied,
              "background_mask": background_mask, "data_out": data_out, "filters2_out": filters2_out,
              "data_norm2_out": data_norm2_out, "noise_var_out": noise_var_out}
    for name, a in arrays.items():
        if not is_device_array(a):
            raise TypeError(f"{name}: expected a CUDA device array, got {type(a).__name__}; "
                            "copy it with numba_recon.cuda.to_device first")
    nb, n = check_prepare_arguments(images, ctf_params, shifts_px, premultiplied, pixel_size_angstrom,
                                    background_mask, data_out, filters2_out, data_norm2_out, noise_var_out,
                                    host=False)
    if nb == 0 or n == 0:
        return
    blocks = min(nb, MAX_BATCH_BLOCKS)
    _background_kernel[blocks, PREP_THREADS](images, _as_uint8(background_mask), data_out,
                                             noise_var_out)
    pt1, pt2, pt3, pt4 = _device_matrices(n)
    half_a = scratch("prepare_particles.a", (nb, 2 * n, n))
    half_b = scratch("prepare_particles.b", (nb, 2 * n, n))
    _stage(pt1, data_out, filters2_out, 0, 1.0, half_a)   # (W X)^T of the centred image
    _stage(pt2, half_a, filters2_out, 0, 1.0, half_b)     # F = W X W, [Re; Im]
    _spectrum_kernel[blocks, PREP_THREADS](half_b, ctf_params, shifts_px, _as_uint8(premultiplied),
                                           np.float64(pixel_size_angstrom), filters2_out, data_norm2_out)
    _stage(pt3, half_b, filters2_out, 0, 1.0, half_a)     # (W* M F)^T
    _stage(pt4, half_a, filters2_out, 0, 1.0 / (n * n), data_out)  # real(ifft2(M F))
