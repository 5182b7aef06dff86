"""Fourier shell correlation, the 0.143 resolution rule, phase randomisation and the FSC plot.

Conventions (RELION ``src/fftw.cpp`` ``getFSC`` and ``src/postprocessing.cpp``):

- A volume of box ``N`` is transformed with a real FFT (``scipy.fft.rfftn``, numpy's layout, half
  transform along x). Fourier index ``k = (kz, ky, kx)`` is signed for z and y, ``0..N//2`` for x.
- Shell ``i`` holds the coefficients with ``ROUND(|k|) == i`` for ``i = 0 .. N//2`` (shell 0 is the
  mean). Coefficients beyond shell ``N//2`` (the corners of the cube) belong to no shell.
- The half transform stores each conjugate pair once; every coefficient with ``0 < kx < N/2`` is
  counted twice, so the sums equal those over the full transform.
- Shell ``i`` has spatial frequency ``i / (N * angpix)`` (1/Angstrom) and resolution
  ``N * angpix / i`` (Angstrom).
"""

from __future__ import annotations

import csv
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import scipy.fft

from numba_recon.errors import InputError
from numba_recon.io.atomic import atomic_output, atomic_write_text

__all__ = [
    "FSCCurve",
    "fsc",
    "resolution_at",
    "last_shell_above",
    "shell_resolutions_angstrom",
    "randomize_phases_beyond",
    "plot_fsc",
    "write_fsc_csv",
]

# RELION writes this in place of the (infinite) resolution of shell 0.
SHELL0_RESOLUTION_ANGSTROM = 999.0


# --------------------------------------------------------------------------------------------
# Fourier grid helpers shared by the evaluate modules
# --------------------------------------------------------------------------------------------

def _fft_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def rfft3(volume: np.ndarray) -> np.ndarray:
    """Unnormalised real FFT of a cubic volume (single precision in, ``complex64`` out)."""
    return scipy.fft.rfftn(np.asarray(volume, dtype=np.float32), workers=_fft_workers())


def irfft3(ft: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`rfft3` for box ``n``; returns float32 ``(n, n, n)``."""
    out = scipy.fft.irfftn(ft, s=(n, n, n), workers=_fft_workers())
    return np.ascontiguousarray(out, dtype=np.float32)


@functools.lru_cache(maxsize=3)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached Fourier geometry of box ``n``.

    Returns ``r2`` (int32, ``(n, n, n//2+1)``: ``|k|^2``), ``shell`` (int32, same shape:
    ``ROUND(|k|)`` clipped to ``n//2 + 1``, the bin of coefficients outside every shell) and the
    Hermitian multiplicity of each x index ``(n//2+1,)``.
    """
    kzy = np.fft.fftfreq(n, d=1.0 / n).round().astype(np.int32)
    kx = np.arange(n // 2 + 1, dtype=np.int32)
    r2 = kzy[:, None, None] ** 2 + kzy[None, :, None] ** 2 + kx[None, None, :] ** 2
    nshell = n // 2 + 1
    shell = np.floor(np.sqrt(r2) + 0.5).astype(np.int32)
    np.minimum(shell, nshell, out=shell)
    mult = np.full(n // 2 + 1, 2.0)
    mult[0] = 1.0
    if n % 2 == 0:
        mult[n // 2] = 1.0
    for a in (r2, shell, mult):
        a.setflags(write=False)
    return r2, shell, mult


def fourier_r2(n: int) -> np.ndarray:
    """``|k|^2`` in Fourier pixels for the half transform of box ``n``: int32 ``(n, n, n//2+1)``."""
    return _grid(n)[0]


def shell_index(n: int) -> np.ndarray:
    """RELION shell ``ROUND(|k|)`` of each half-transform coefficient, ``n//2 + 1`` beyond the last shell."""
    return _grid(n)[1]


def shell_sum(values: np.ndarray, n: int) -> np.ndarray:
    """Sum of a per-coefficient quantity over each shell, full-transform counting.

    Parameters
    ----------
    values
        Real array ``(n, n, n//2+1)`` on the half transform.
    n
        Box size.

    Returns
    -------
    numpy.ndarray
        ``(n//2 + 1,)`` float64 sums over shells ``0 .. n//2``.
    """
    _, shell, mult = _grid(n)
    weighted = np.asarray(values, dtype=np.float64) * mult
    sums = np.bincount(shell.ravel(), weights=weighted.ravel(), minlength=n // 2 + 2)
    return sums[: n // 2 + 1]


@functools.lru_cache(maxsize=3)
def shell_counts(n: int) -> np.ndarray:
    """Number of full-transform Fourier coefficients in each shell ``0 .. n//2`` (float64, read-only)."""
    counts = shell_sum(np.ones(fourier_r2(n).shape), n)
    counts.setflags(write=False)
    return counts


def per_shell(factors: np.ndarray, n: int) -> np.ndarray:
    """Expand per-shell factors ``(n//2+1,)`` onto the half transform; coefficients outside every
    shell get 0."""
    table = np.zeros(n // 2 + 2, dtype=np.float64)
    table[: n // 2 + 1] = factors
    return table[shell_index(n)]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def check_volume(volume: np.ndarray, name: str = "map") -> np.ndarray:
    """Return ``volume`` as a float32 cube or raise :class:`InputError` naming what is wrong."""
    v = np.asarray(volume)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError(f"{name} has shape {v.shape}, not a cube (N, N, N)",
                         fix="use a cubic map (resize or pad it first)")
    if v.shape[0] < 4:
        raise InputError(f"{name} box {v.shape[0]} is too small", fix="use a box of at least 4 voxels")
    v = np.asarray(v, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise InputError(f"{name} contains NaN or infinite values", fix="check how the map was made")
    return v


def check_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """Return ``mask`` as float32 after checking its shape and that its values lie in [0, 1]
    (RELION's tolerance 1e-6)."""
    m = np.asarray(mask, dtype=np.float32)
    if m.shape != tuple(shape):
        raise InputError(f"{name} has shape {m.shape} but the maps have {tuple(shape)}",
                         fix="make the mask from a map with the same box")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{name} contains NaN or infinite values", fix="recreate the mask")
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise InputError(f"{name} values span [{lo:.4g}, {hi:.4g}], outside [0, 1]",
                         fix="use a mask with values between 0 (solvent) and 1 (protein), e.g. from 'numba-recon mask'")
    return m


# --------------------------------------------------------------------------------------------
# FSC
# --------------------------------------------------------------------------------------------

def fsc_from_ft(ft1: np.ndarray, ft2: np.ndarray, n: int) -> np.ndarray:
    """FSC of two half transforms of box ``n`` (see :func:`fsc`)."""
    num = shell_sum(ft1.real * ft2.real + ft1.imag * ft2.imag, n)
    den1 = shell_sum(ft1.real ** 2 + ft1.imag ** 2, n)
    den2 = shell_sum(ft2.real ** 2 + ft2.imag ** 2, n)
    den = np.sqrt(den1 * den2)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def fsc(map1: np.ndarray, map2: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Fourier shell correlation of two maps, RELION's shells.

    ``FSC(i) = sum Re(F1 conj F2) / sqrt(sum |F1|^2 sum |F2|^2)`` over the coefficients with
    ``ROUND(|k|) == i`` (full transform), shell 0 included. A shell where either map has no power
    gets 0.

    Parameters
    ----------
    map1, map2
        Volumes ``(N, N, N)``.
    mask
        Optional ``(N, N, N)`` mask with values in [0, 1]; both maps are multiplied by it first.

    Returns
    -------
    numpy.ndarray
        ``(N//2 + 1,)`` float64, shell ``i`` at ``i / (N * angpix)`` 1/Angstrom.
    """
    a = check_volume(map1, "map1")
    b = check_volume(map2, "map2")
    if a.shape != b.shape:
        raise InputError(f"the maps have different boxes {a.shape} and {b.shape}",
                         fix="compare maps with the same box size")
    if mask is not None:
        m = check_mask(mask, a.shape)
        a = a * m
        b = b * m
    n = a.shape[0]
    return fsc_from_ft(rfft3(a), rfft3(b), n)


def shell_resolutions_angstrom(box_size: int, pixel_size_angstrom: float) -> np.ndarray:
    """Resolution ``N * angpix / i`` of shells ``0 .. N//2``; shell 0 is written as 999.0 (RELION)."""
    i = np.arange(box_size // 2 + 1, dtype=np.float64)
    res = np.full_like(i, SHELL0_RESOLUTION_ANGSTROM)
    res[1:] = box_size * pixel_size_angstrom / i[1:]
    return res


def last_shell_above(fsc_curve: np.ndarray, threshold: float) -> int:
    """RELION's rule: the last shell, scanning up from shell 1, before the first FSC < threshold.

    Returns 0 when shell 1 is already below the threshold.
    """
    curve = np.asarray(fsc_curve, dtype=np.float64)
    last = 0
    for i in range(1, curve.size):
        if not curve[i] >= threshold:  # NaN counts as a drop
            break
        last = i
    return last


def resolution_at(fsc_curve: np.ndarray, box_size: int, pixel_size_angstrom: float,
                  threshold: float = 0.143, interpolate: bool = False) -> float:
    """Resolution (Angstrom) at which an FSC curve crosses ``threshold``, by RELION's rule.

    Scanning from shell 1 upward, stop at the *first* shell whose FSC is below ``threshold`` and
    report the resolution ``N * angpix / i`` of the shell before it; a later rebound above the
    threshold is ignored (``relion_postprocess``; cryoDRGN instead takes the highest shell above).

    - If the curve never drops below the threshold, the resolution of the last shell ``N//2`` is
      returned: Nyquist, ``2 * angpix``, for even boxes.
    - If shell 1 is already below the threshold, ``N * angpix`` (the box size in Angstrom, the
      resolution of shell 1) is returned: no resolution can be claimed.

    Parameters
    ----------
    fsc_curve
        ``(N//2 + 1,)`` FSC values for shells ``0 .. N//2``.
    box_size
        ``N``.
    pixel_size_angstrom
        Voxel size.
    threshold
        0.143 for gold-standard half maps (Rosenthal & Henderson 2003), 0.5 for other uses.
    interpolate
        Interpolate linearly in spatial frequency between the last shell above and the first shell
        below the threshold (RELION ``--interpolate``), instead of reporting the last shell.
    """
    curve = np.asarray(fsc_curve, dtype=np.float64)
    if curve.ndim != 1 or curve.size != box_size // 2 + 1:
        raise InputError(f"FSC curve has {curve.size} shells but a box of {box_size} has {box_size // 2 + 1}",
                         fix="pass the curve computed for this box size")
    if not pixel_size_angstrom > 0:
        raise InputError(f"pixel size {pixel_size_angstrom} must be positive", fix="pass --angpix")
    box_angstrom = box_size * pixel_size_angstrom
    last = last_shell_above(curve, threshold)
    if last == 0:
        return float(box_angstrom)
    if interpolate and last + 1 < curve.size:
        hi, lo = curve[last], curve[last + 1]
        frac = (hi - threshold) / (hi - lo) if hi != lo else 0.0
        return float(box_angstrom / (last + frac))
    return float(box_angstrom / last)


@dataclass(frozen=True)
class FSCCurve:
    """An FSC curve with its shell axis.

    Attributes
    ----------
    spectral_index
        ``(N//2 + 1,)`` int shell numbers ``0 .. N//2``.
    resolution_inv_angstrom
        ``(N//2 + 1,)`` spatial frequency ``i / (N * angpix)``.
    resolution_angstrom
        ``(N//2 + 1,)`` ``N * angpix / i``; 999.0 for shell 0 (as RELION writes it).
    fsc
        ``(N//2 + 1,)`` correlation per shell.
    box_size
        ``N``.
    pixel_size_angstrom
        Voxel size.
    """

    spectral_index: np.ndarray
    resolution_inv_angstrom: np.ndarray
    resolution_angstrom: np.ndarray
    fsc: np.ndarray
    box_size: int
    pixel_size_angstrom: float

    @classmethod
    def from_values(cls, fsc_curve: np.ndarray, box_size: int, pixel_size_angstrom: float) -> "FSCCurve":
        """Wrap per-shell FSC values of a box of ``box_size`` voxels of ``pixel_size_angstrom``."""
        curve = np.asarray(fsc_curve, dtype=np.float64)
        if curve.size != box_size // 2 + 1:
            raise InputError(f"FSC curve has {curve.size} shells but a box of {box_size} has {box_size // 2 + 1}",
                             fix="pass the curve computed for this box size")
        idx = np.arange(curve.size)
        return cls(spectral_index=idx,
                   resolution_inv_angstrom=idx / (box_size * pixel_size_angstrom),
                   resolution_angstrom=shell_resolutions_angstrom(box_size, pixel_size_angstrom),
                   fsc=curve, box_size=int(box_size), pixel_size_angstrom=float(pixel_size_angstrom))

    @classmethod
    def from_maps(cls, map1: np.ndarray, map2: np.ndarray, pixel_size_angstrom: float,
                  mask: np.ndarray | None = None) -> "FSCCurve":
        """FSC of two ``(N, N, N)`` maps (optionally both multiplied by ``mask``)."""
        values = fsc(map1, map2, mask)
        return cls.from_values(values, np.shape(map1)[0], pixel_size_angstrom)

    def resolution(self, threshold: float = 0.143, interpolate: bool = False) -> float:
        """Resolution (Angstrom) at ``threshold`` by RELION's rule (see :func:`resolution_at`)."""
        return resolution_at(self.fsc, self.box_size, self.pixel_size_angstrom, threshold, interpolate)

    def to_csv(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``spectral_index, resolution_inv_angstrom, resolution_angstrom, fsc`` (atomic)."""
        return _write_table_csv(path, self, {"fsc": self.fsc}, overwrite)


def _write_table_csv(path: str | os.PathLike, axis: FSCCurve, curves: Mapping[str, np.ndarray],
                     overwrite: bool) -> Path:
    from numba_recon.provenance import comment_lines

    buf = io.StringIO()
    # "#" lines first: the version and the command (readers skip them, e.g. read_csv(comment="#"))
    buf.write("".join(f"{line}\n" for line in comment_lines()))
    writer = csv.writer(buf, lineterminator="\n")
    names = list(curves)
    writer.writerow(["spectral_index", "resolution_inv_angstrom", "resolution_angstrom", *names])
    for i in range(axis.spectral_index.size):
        row = [int(axis.spectral_index[i]), f"{axis.resolution_inv_angstrom[i]:.6f}",
               f"{axis.resolution_angstrom[i]:.4f}"]
        row += [f"{float(np.asarray(curves[k])[i]):.6f}" for k in names]
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue(), overwrite=overwrite)


def write_fsc_csv(path: str | os.PathLike, curves: Mapping[str, np.ndarray], box_size: int,
                  pixel_size_angstrom: float, overwrite: bool = False) -> Path:
    """Write several FSC curves of one box as CSV columns next to the shell axis (atomic).

    Parameters
    ----------
    path
        Output ``.csv`` file.
    curves
        Column name -> ``(N//2 + 1,)`` values, in the column order wanted.
    box_size, pixel_size_angstrom
        Define the shell axis.
    overwrite
        Replace an existing file.
    """
    first = next(iter(curves.values()))
    axis = FSCCurve.from_values(first, box_size, pixel_size_angstrom)
    for name, values in curves.items():
        if np.asarray(values).size != axis.fsc.size:
            raise InputError(f"curve {name!r} has {np.asarray(values).size} shells, expected {axis.fsc.size}",
                             fix="pass curves computed for this box size")
    return _write_table_csv(path, axis, curves, overwrite)


# --------------------------------------------------------------------------------------------
# Phase randomisation
# --------------------------------------------------------------------------------------------

def _conjugate_partner(n: int) -> np.ndarray:
    """Index of ``-k`` for each signed index ``k`` along an axis of length ``n``."""
    return (-np.arange(n)) % n


def randomize_phases_from_ft(ft: np.ndarray, n: int, shell: int, rng: np.random.Generator) -> np.ndarray:
    """Phase randomisation on a half transform (see :func:`randomize_phases_beyond`); returns a new array."""
    r2 = fourier_r2(n)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=ft.shape)
    # In the planes kx = 0 (and kx = N/2 for even N) the half transform holds both k and -k; give
    # each pair opposite phases so the map stays real. phi(k) - phi(-k) is again uniform mod 2 pi.
    planes = [0] + ([n // 2] if n % 2 == 0 else [])
    partner = _conjugate_partner(n)
    self_conj = [0] + ([n // 2] if n % 2 == 0 else [])
    for kx in planes:
        p = phase[:, :, kx]
        p = p - p[np.ix_(partner, partner)]
        # self-conjugate coefficients are real: keep the amplitude, draw the sign
        for kz in self_conj:
            for ky in self_conj:
                p[kz, ky] = np.pi * rng.integers(0, 2)
        phase[:, :, kx] = p
    out = ft.copy()
    sel = r2 >= shell * shell
    amp = np.abs(ft[sel])
    out[sel] = amp * np.exp(1j * phase[sel])
    return out


def randomize_phases_beyond(volume: np.ndarray, shell: int,
                            seed: int | np.random.Generator = 0) -> np.ndarray:
    """Keep the Fourier amplitudes, replace the phases by uniform random ones from a shell on.

    Every coefficient with ``|k|^2 >= shell^2`` gets a phase drawn uniformly in [0, 2 pi)
    (RELION ``randomizePhasesBeyond``); conjugate pairs get opposite phases, so the result is a real
    map with exactly the input amplitudes.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    shell
        First randomised shell, ``>= 1`` (Fourier pixels).
    seed
        Seed or a ``numpy.random.Generator`` (pass the same generator to randomise several maps
        with independent phases, as RELION does for the two half maps).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)``.
    """
    v = check_volume(volume)
    if int(shell) < 1:
        raise InputError(f"randomisation shell {shell} must be at least 1", fix="pass a shell >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = v.shape[0]
    return irfft3(randomize_phases_from_ft(rfft3(v), n, int(shell), rng), n)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

def _new_figure(width_in: float = 7.0, height_in: float = 4.6):
    # Draw on an explicit Agg canvas instead of pyplot: works without a display (clusters are
    # headless) and leaves the caller's pyplot backend alone (e.g. inline plots in a notebook).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, overwrite: bool = True, dpi: int = 150) -> Path:
    """Save a figure as PNG under a temporary name, then rename it onto ``path`` (listed in the
    output manifest, as every :func:`~numba_recon.io.atomic.atomic_output` write)."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


#: Resolutions (Angstrom) that may label the top axis of an FSC plot.
_RESOLUTION_TICKS_ANGSTROM = (50, 20, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1.2, 1.0)


def fsc_axes(ax, freq: np.ndarray, lowest: float) -> None:
    """Frame the axes of an FSC plot: x from 0 to the last shell's frequency, y from
    ``max(-1.05, min(-0.1, lowest))`` to 1.05, axis labels, a light grid and a secondary top axis
    in resolution (Angstrom).

    Parameters
    ----------
    ax
        Matplotlib axes the curves are drawn on.
    freq
        ``(box//2 + 1,)`` spatial frequencies of the shells, 1/Angstrom.
    lowest
        The lowest FSC value drawn.
    """
    ax.set_xlim(0.0, freq[-1])
    # a corrected FSC can swing far below -1 where 1 - FSC_random is tiny; keep the plot readable
    ax.set_ylim(max(-1.05, min(-0.1, lowest)), 1.05)
    ax.set_xlabel("spatial frequency (1/\u00c5)")
    ax.set_ylabel("Fourier shell correlation")
    ax.grid(alpha=0.3)

    floor = 1e-3 * float(freq[-1])

    def _inv(x):
        # 1/x, kept finite at x = 0 (matplotlib rejects infinite axis limits)
        return 1.0 / np.maximum(np.asarray(x, dtype=np.float64), floor)

    top = ax.secondary_xaxis("top", functions=(_inv, _inv))
    top.set_xlabel("resolution (\u00c5)")
    # resolutions below 4 % of the last frequency would crowd the left edge, where 1/x is steep
    ticks = [r for r in _RESOLUTION_TICKS_ANGSTROM if 0.04 * freq[-1] <= 1.0 / r <= freq[-1]]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{t:g}" for t in ticks])


def plot_fsc(curves: Mapping[str, np.ndarray], box: int, angpix: float, path: str | os.PathLike,
             resolution: float | None = None, title: str | None = None,
             overwrite: bool = True) -> Path:
    """Plot FSC curves against spatial frequency and save a PNG (atomic).

    The x axis is spatial frequency in 1/Angstrom with a secondary Angstrom axis on top;
    horizontal lines mark 0.143 and 0.5; ``resolution`` (Angstrom), if given, is marked with a
    vertical line and its value.

    Parameters
    ----------
    curves
        Label -> ``(box//2 + 1,)`` FSC values, drawn in order.
    box
        Box size ``N`` in voxels.
    angpix
        Voxel size in Angstrom.
    path
        Output PNG.
    resolution
        Resolution to mark, in Angstrom.
    title
        Plot title (default: the marked resolution).
    overwrite
        Replace an existing file (default True: plots are refreshed, e.g. by the report).
    """
    if not curves:
        raise InputError("no FSC curves to plot", fix="pass at least one curve")
    freq = np.arange(box // 2 + 1) / (box * angpix)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size != freq.size:
            raise InputError(f"FSC curve {label!r} has {values.size} shells, expected {freq.size}",
                             fix="pass curves computed for this box size")
        ax.plot(freq, values, label=label, linewidth=1.6)
    ax.axhline(0.143, color="0.35", linestyle="--", linewidth=0.9)
    ax.axhline(0.5, color="0.35", linestyle=":", linewidth=0.9)
    ax.text(freq[-1], 0.143, " 0.143", va="center", ha="left", fontsize=8, color="0.35")
    ax.text(freq[-1], 0.5, " 0.5", va="center", ha="left", fontsize=8, color="0.35")
    if resolution is not None and resolution > 0:
        ax.axvline(1.0 / resolution, color="tab:red", linestyle="-.", linewidth=1.0)
        ax.annotate(f"{resolution:.2f} \u00c5", xy=(1.0 / resolution, 0.95), xytext=(4, 0),
                    textcoords="offset points", color="tab:red", fontsize=9)
    lowest = float(np.nanmin([np.nanmin(np.asarray(v, dtype=np.float64)) for v in curves.values()]))
    fsc_axes(ax, freq, lowest)
    if title is None and resolution is not None:
        title = f"resolution {resolution:.2f} \u00c5 (FSC = 0.143)"
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return save_figure(fig, path, overwrite)
