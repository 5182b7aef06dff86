"""Fourier filters of ``relion_postprocess``: low-pass, B-factor, Guinier plot and fit, FSC weighting.

All filters act on the real FFT of a cubic map (shells and frequencies as in
:mod:`numba_recon.evaluate.fsc`); spatial frequency ``s = |k| / (N * angpix)`` in 1/Angstrom.
Functions named ``*_ft`` work on a half transform so that the post-processing pipeline transforms
each map once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numba_recon.errors import InputError
from numba_recon.evaluate.fsc import (check_volume, fourier_r2, irfft3, per_shell, rfft3,
                                      shell_counts, shell_sum)

__all__ = [
    "lowpass",
    "lowpass_factor",
    "apply_bfactor",
    "guinier",
    "GuinierFit",
    "fit_bfactor",
    "fit_guinier_line",
    "fsc_weight",
    "fsc_weighting_factors",
]


def _check_pixel_size(pixel_size_angstrom: float) -> float:
    if pixel_size_angstrom is None or not float(pixel_size_angstrom) > 0:
        raise InputError(f"pixel size {pixel_size_angstrom} must be a positive number of Angstrom",
                         fix="pass --angpix or fix the map header")
    return float(pixel_size_angstrom)


def _relion_round(x: float) -> int:
    """RELION's ``ROUND``: halves away from zero."""
    return int(np.floor(x + 0.5)) if x >= 0 else -int(np.floor(-x + 0.5))


def _filter_map(v: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Multiply the half transform of a checked ``(N, N, N)`` map by ``factor`` and transform back.

    ``factor`` is ``(N, N, N//2 + 1)`` or broadcasts to it (e.g. :func:`per_shell`); returns float32
    ``(N, N, N)``.
    """
    ft = rfft3(v)
    ft *= factor
    return irfft3(ft, v.shape[0])


# --------------------------------------------------------------------------------------------
# Low-pass
# --------------------------------------------------------------------------------------------

def lowpass_factor(n: int, resolution_angstrom: float, pixel_size_angstrom: float,
                   edge_width_shells: int = 2) -> np.ndarray:
    """RELION's raised-cosine low-pass factor on the half transform of box ``n``.

    With ``ires = ROUND(N * angpix / resolution)`` and ``h = edge_width_shells // 2`` (integer
    division, as RELION), the frequency ``s = |k| / N`` (1/pixel) is kept below
    ``edge_low = (ires - h) / N``, removed above ``edge_high = (ires + h) / N``, and weighted by
    ``0.5 + 0.5 cos(pi (s - edge_low) / (edge_high - edge_low))`` in between
    (``lowPassFilterMap``, ``src/fftw.cpp``). With ``h = 0`` the edge is a hard cut at ``ires``.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n, n//2 + 1)``.
    """
    angpix = _check_pixel_size(pixel_size_angstrom)
    if resolution_angstrom is None or not float(resolution_angstrom) > 0:
        raise InputError(f"low-pass resolution {resolution_angstrom} must be a positive number of Angstrom",
                         fix="pass a resolution such as 8 (Angstrom)")
    if int(edge_width_shells) < 0:
        raise InputError(f"edge width {edge_width_shells} must not be negative", fix="use e.g. 2 shells")
    ires = _relion_round(n * angpix / float(resolution_angstrom))
    half = int(edge_width_shells) // 2
    edge_low = max(0.0, (ires - half) / n)
    edge_high = min(float(n // 2 + 1), (ires + half) / n)
    s = np.sqrt(fourier_r2(n)) / n
    if edge_high <= edge_low:
        return (s <= edge_low).astype(np.float64)
    factor = 0.5 + 0.5 * np.cos(np.pi * (s - edge_low) / (edge_high - edge_low))
    factor[s < edge_low] = 1.0
    factor[s > edge_high] = 0.0
    return factor


def lowpass(volume: np.ndarray, resolution_angstrom: float, pixel_size_angstrom: float,
            edge_width_shells: int = 2) -> np.ndarray:
    """Low-pass filter a map with RELION's raised-cosine edge (see :func:`lowpass_factor`).

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    resolution_angstrom
        Filter resolution; the edge is centred on shell ``ROUND(N * angpix / resolution)``.
    pixel_size_angstrom
        Voxel size.
    edge_width_shells
        Width of the cosine edge in shells (RELION ``--filter_edge_width``, default 2).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)``.
    """
    v = check_volume(volume)
    return _filter_map(v, lowpass_factor(v.shape[0], resolution_angstrom, pixel_size_angstrom, edge_width_shells))


# --------------------------------------------------------------------------------------------
# B-factor
# --------------------------------------------------------------------------------------------

def bfactor_factor(n: int, bfactor_angstrom2: float, pixel_size_angstrom: float) -> np.ndarray:
    """``exp(-(B/4) s^2)`` for ``s <= 1 / (2 angpix)`` (Nyquist), 0 beyond (RELION ``applyBFactorToMap``)."""
    angpix = _check_pixel_size(pixel_size_angstrom)
    r2 = fourier_r2(n)
    s2 = r2 / float(n * angpix) ** 2
    factor = np.exp(-(float(bfactor_angstrom2) / 4.0) * s2)
    factor[4 * r2 > n * n] = 0.0  # |k| / N > 1/2: beyond Nyquist
    return factor


def apply_bfactor(volume: np.ndarray, bfactor_angstrom2: float, pixel_size_angstrom: float) -> np.ndarray:
    """Multiply the Fourier transform by ``exp(-(B/4) s^2)`` up to Nyquist and zero it beyond.

    A negative ``bfactor_angstrom2`` sharpens, a positive one blurs.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    bfactor_angstrom2
        B in Angstrom^2.
    pixel_size_angstrom
        Voxel size.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)``.
    """
    v = check_volume(volume)
    return _filter_map(v, bfactor_factor(v.shape[0], bfactor_angstrom2, pixel_size_angstrom))


# --------------------------------------------------------------------------------------------
# Guinier plot and fit
# --------------------------------------------------------------------------------------------

def guinier_from_ft(ft: np.ndarray, n: int, pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Guinier plot of an unnormalised half transform (see :func:`guinier`)."""
    angpix = _check_pixel_size(pixel_size_angstrom)
    # RELION's forward FFT divides by the number of voxels; its ln-amplitudes (and the fitted
    # intercept) are on that scale.
    amp = np.abs(ft).astype(np.float64) / float(n) ** 3
    mean = shell_sum(amp, n) / shell_counts(n)
    i = np.arange(n // 2 + 1, dtype=np.float64)
    s2 = (i / (n * angpix)) ** 2
    ln = np.full_like(mean, np.nan)
    np.log(mean, out=ln, where=mean > 0)
    return s2, ln


def guinier(volume: np.ndarray, pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Guinier plot: log of the mean Fourier amplitude per shell against ``s^2``.

    Shells ``0 .. N//2`` (up to Nyquist), ``s^2 = (i / (N angpix))^2`` in 1/Angstrom^2, amplitudes
    of the forward FFT divided by ``N^3`` (RELION's normalisation) and averaged over the full
    transform. A shell with zero amplitude gets NaN (RELION writes -99 there).

    Returns
    -------
    s2, ln_amplitude
        Two ``(N//2 + 1,)`` float64 arrays.
    """
    v = check_volume(volume)
    return guinier_from_ft(rfft3(v), v.shape[0], pixel_size_angstrom)


@dataclass(frozen=True)
class GuinierFit:
    """Straight line ``ln|F| = intercept + slope * s^2`` through the Guinier plot.

    ``bfactor_angstrom2 = 4 * slope`` (negative for a map whose amplitudes fall off, i.e. the B
    that sharpens it); ``correlation`` is RELION's ``ss_xy^2 / (ss_xx ss_yy)`` (r squared);
    ``used`` marks the shells in the fit.
    """

    bfactor_angstrom2: float
    slope: float
    intercept: float
    correlation: float
    used: np.ndarray


def fit_guinier_line(s2: np.ndarray, ln_amplitude: np.ndarray, box_size: int, pixel_size_angstrom: float,
                     low_res_angstrom: float = 10.0, high_res_angstrom: float | None = None) -> GuinierFit:
    """Fit RELION's straight line to a Guinier plot.

    Shells ``i >= 1`` with ``high_res_angstrom <= N angpix / i <= low_res_angstrom`` and a finite
    ln-amplitude get weight 1, all others 0 (``makeGuinierPlot`` + ``fitStraightLine``).
    ``high_res_angstrom=None`` fits up to Nyquist (RELION's ``--autob_highres 0``).

    Raises
    ------
    InputError
        Fewer than two shells in the range.
    """
    angpix = _check_pixel_size(pixel_size_angstrom)
    if not float(low_res_angstrom) > 0:
        raise InputError(f"low-resolution limit {low_res_angstrom} must be positive", fix="use e.g. 10 (Angstrom)")
    hi = 0.0 if high_res_angstrom is None else float(high_res_angstrom)
    s2 = np.asarray(s2, dtype=np.float64)
    y = np.asarray(ln_amplitude, dtype=np.float64)
    i = np.arange(s2.size)
    res = np.full(s2.size, np.inf)
    res[1:] = box_size * angpix / i[1:]
    used = (i >= 1) & (res <= low_res_angstrom) & (res >= hi) & np.isfinite(y)
    if used.sum() < 2:
        raise InputError(
            f"the Guinier fit between {low_res_angstrom:g} and "
            f"{'Nyquist' if high_res_angstrom is None else f'{hi:.3g} Angstrom'} has {int(used.sum())} shell(s), "
            "at least 2 are needed",
            fix="lower the low-resolution limit (--autob-lowres) or give a B-factor (--bfactor)")
    x, yy = s2[used], y[used]
    ave_x, ave_y = x.mean(), yy.mean()
    ss_xx = float(((x - ave_x) ** 2).sum())
    ss_yy = float(((yy - ave_y) ** 2).sum())
    ss_xy = float(((x - ave_x) * (yy - ave_y)).sum())
    slope = ss_xy / ss_xx
    intercept = float(ave_y - slope * ave_x)
    corr = ss_xy * ss_xy / (ss_xx * ss_yy) if ss_yy > 0 else 1.0
    return GuinierFit(bfactor_angstrom2=4.0 * slope, slope=slope, intercept=intercept,
                      correlation=corr, used=used)


def fit_bfactor(volume: np.ndarray, pixel_size_angstrom: float, low_res_angstrom: float = 10.0,
                high_res_angstrom: float | None = None) -> tuple[float, float, float]:
    """Fit a B-factor to a map's Guinier plot (Rosenthal & Henderson 2003, as ``relion_postprocess``).

    Parameters
    ----------
    volume
        ``(N, N, N)`` map (``relion_postprocess`` fits the FSC-weighted average of the half maps).
    pixel_size_angstrom
        Voxel size.
    low_res_angstrom
        Lowest resolution in the fit (RELION ``--autob_lowres``, default 10).
    high_res_angstrom
        Highest resolution in the fit, usually the FSC = 0.143 resolution; ``None`` fits up to
        Nyquist (RELION's default ``--autob_highres 0``).

    Returns
    -------
    bfactor_angstrom2, intercept, correlation
        ``B = 4 * slope`` of ``ln|F|`` against ``s^2`` (negative for a blurred map: apply it with
        :func:`apply_bfactor` to sharpen), the intercept and r squared of the fit.
    """
    v = check_volume(volume)
    s2, ln = guinier(v, pixel_size_angstrom)
    fit = fit_guinier_line(s2, ln, v.shape[0], pixel_size_angstrom, low_res_angstrom, high_res_angstrom)
    return fit.bfactor_angstrom2, fit.intercept, fit.correlation


# --------------------------------------------------------------------------------------------
# FSC weighting
# --------------------------------------------------------------------------------------------

def fsc_weighting_factors(fsc_true: np.ndarray) -> np.ndarray:
    """Per-shell weights ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson 2003).

    RELION's ``applyFscWeighting``: scanning from shell 0, every shell from the first one with
    ``FSC < 1e-4`` on is set to 0; a non-positive FSC before that also gives 0.
    """
    f = np.asarray(fsc_true, dtype=np.float64)
    ires_max = 0
    for i in range(f.size):
        if not f[i] >= 1e-4:
            break
        ires_max = i
    w = np.zeros_like(f)
    keep = np.arange(f.size) <= ires_max
    pos = keep & (f > 0)
    w[pos] = np.sqrt(2.0 * f[pos] / (1.0 + f[pos]))
    return w


def fsc_weight(volume: np.ndarray, fsc_true: np.ndarray) -> np.ndarray:
    """Multiply each Fourier shell of a map by ``sqrt(2 FSC / (1 + FSC))``, zero from the first
    shell with ``FSC < 1e-4`` (see :func:`fsc_weighting_factors`).

    Parameters
    ----------
    volume
        ``(N, N, N)`` map, usually the average of the two half maps.
    fsc_true
        ``(N//2 + 1,)`` (corrected) FSC of the half maps.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)``.
    """
    v = check_volume(volume)
    n = v.shape[0]
    f = np.asarray(fsc_true, dtype=np.float64)
    if f.ndim != 1 or f.size != n // 2 + 1:
        raise InputError(f"FSC curve has {f.size} shells but a box of {n} has {n // 2 + 1}",
                         fix="pass the FSC computed for this box size")
    return _filter_map(v, per_shell(fsc_weighting_factors(f), n))
