"""Local resolution from windowed half-map FSCs, as ``relion_postprocess --locres``.

The method follows ``Postprocessing::run_locres`` of RELION (``src/postprocessing.cpp``):

1. Sampling points: the voxels ``N//2 + j * step`` along each axis (``step = ROUND(sampling /
   angpix)``, integer ``j``) where the mask is above 0.5. (RELION ignores the mask and samples a
   sphere of radius ``N/2 - window radius``.)
2. Window: a sphere around each point, 1 out to radius ``r0``, a raised cosine
   ``0.5 + 0.5 cos(pi (r - r0) / e)`` from ``r0`` to ``r0 + e``, 0 beyond. ``--window-angstrom D``
   is the diameter at half height, ``e`` the edge width, so ``r0 = D/2 - e/2``. RELION's defaults
   (``--locres_sampling 25``, ``--locres_maskrad 12.5``, ``--locres_edgwidth 25``) are ``D = 50``,
   ``e = 25``, sampling 25 Angstrom, the defaults here.
3. Windowed FSC: both half maps are multiplied by the window and their FSC is computed. RELION
   transforms the whole box for every point; here only the cube of side ``2 ceil(r0 + e) + 1``
   around the point (the window's support) is cut out and zero-padded to the sub-box ``M`` (the
   next FFT-friendly even size), so each FFT is small. Zero-padding does not change the windowed
   maps, only the spacing of the Fourier samples: shells are those of box ``M``, shell ``i`` at
   ``M angpix / i`` Angstrom.
4. Mask-induced correlation is corrected as RELION does: both unmasked half maps get random phases
   beyond ``--randomize-at-angstrom`` (25 A; shell ``int(N angpix / 25)`` of the full box), are
   windowed the same way, and ``FSC_true = (FSC - FSC_random) / (1 - FSC_random)`` from sub-box
   shell ``int(M angpix / 25) + 2`` on.
5. Local resolution of a point: the last shell before ``FSC_true`` first drops below the threshold
   (0.143 by default; :func:`~numba_recon.evaluate.fsc.last_shell_above`), ``M angpix / shell``.
   A window whose FSC is below the threshold already at shell 1 gets ``M angpix`` (no resolution;
   counted as unresolved).
6. Map: every voxel gets the window-weighted mean of the *spatial frequencies* of the points whose
   windows reach it, ``1 / (sum_p w_p(x) / res_p / sum_p w_p(x))`` (RELION). Voxels with mask
   value > 0 that no window reaches take the value of the nearest sampling point; voxels where the
   mask is 0 are 0 (RELION also writes 0 where no window reaches).

Differences from RELION: the sub-box shells (coarser than the full box's, which are correlated
anyway at that spacing after windowing), the mask choosing the sampling points, no
``--locres_minres`` cap (unresolved windows keep ``M angpix`` and are counted), no locally filtered
map, and full-transform shell counting (see ``docs/postprocessing.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import scipy.fft

from numba_recon.checks import finite_above
from numba_recon.errors import InputError
from numba_recon.evaluate.fsc import (_fft_workers, _new_figure, check_mask, check_volume, irfft3,
                                      last_shell_above, randomize_phases_from_ft, rfft3, save_figure, shell_index)
from numba_recon.io.atomic import atomic_output

__all__ = ["LocresResult", "local_resolution", "window_profile", "sampling_points", "subbox_size",
           "check_locres_outputs", "write_locres", "LOCRES_FILES", "DEFAULT_WINDOW_ANGSTROM",
           "DEFAULT_FSC_THRESHOLD", "DEFAULT_RANDOMIZE_AT_ANGSTROM"]

logger = logging.getLogger(__name__)

#: Output file names written by :func:`write_locres`.
LOCRES_FILES = ("locres.mrc", "locres_histogram.png", "locres.csv", "locres_summary.json", "locres_sliced.png")

#: Window diameter at half height (Angstrom): RELION's default window (radius 12.5 A + 25 A edge).
DEFAULT_WINDOW_ANGSTROM = 50.0
#: Threshold on the windowed FSC (half maps: Rosenthal & Henderson 2003; RELION's --locres).
DEFAULT_FSC_THRESHOLD = 0.143
#: Phases are randomised beyond this resolution for the mask correction (RELION --locres_randomize_at).
DEFAULT_RANDOMIZE_AT_ANGSTROM = 25.0

# Voxels with mask values above this are "inside": sampled, and counted in the statistics (RELION
# samples where a mask is > 0.5 in its other masked computations).
INSIDE_MASK_THRESHOLD = 0.5
# Memory for one batch of windowed sub-boxes and their transforms.
_BATCH_BYTES = 256 * 2 ** 20


@dataclass
class LocresResult:
    """Everything :func:`local_resolution` computed.

    Attributes
    ----------
    box_size, pixel_size_angstrom
        Geometry of the maps.
    locres
        ``(N, N, N)`` float32 local resolution in Angstrom; 0 where the mask is 0.
    inside
        ``(N, N, N)`` bool, mask > 0.5: the voxels of the statistics and the histogram.
    average
        ``(N, N, N)`` float32 average of the half maps (for the sliced figure).
    points
        ``(P, 3)`` int64 sampling points as voxel indices ``(x, y, z)``.
    point_resolution_angstrom
        ``(P,)`` local resolution at each point.
    point_shell
        ``(P,)`` int sub-box shell of that resolution (0: unresolved, the FSC is below the
        threshold at shell 1).
    window_diameter_angstrom, window_edge_angstrom
        Window diameter at half height and width of its cosine edge.
    sampling_angstrom, sampling_px
        Requested grid spacing and the integer voxel step used (``ROUND(sampling / angpix)``).
    subbox_size
        ``M``: box of the windowed FFTs; shell ``i`` is at ``M angpix / i`` Angstrom.
    fsc_threshold
        Threshold on the windowed FSC.
    randomize_at_angstrom
        Resolution beyond which phases were randomised (``None``: no correction).
    warnings
        Warnings raised on the way (also logged).
    """

    box_size: int
    pixel_size_angstrom: float
    locres: np.ndarray
    inside: np.ndarray
    average: np.ndarray
    points: np.ndarray
    point_resolution_angstrom: np.ndarray
    point_shell: np.ndarray
    window_diameter_angstrom: float
    window_edge_angstrom: float
    sampling_angstrom: float
    sampling_px: int
    subbox_size: int
    fsc_threshold: float
    randomize_at_angstrom: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def shell_width_inv_angstrom(self) -> float:
        """Spacing of the sub-box shells in spatial frequency, ``1 / (M angpix)``."""
        return 1.0 / (self.subbox_size * self.pixel_size_angstrom)

    def statistics(self) -> dict[str, float]:
        """Median, 5th and 95th percentile, minimum and maximum of the map inside the mask (Angstrom)."""
        values = self.locres[self.inside].astype(np.float64)
        p5, median, p95 = np.percentile(values, [5.0, 50.0, 95.0])
        return {"median_angstrom": float(median), "percentile_5_angstrom": float(p5),
                "percentile_95_angstrom": float(p95), "min_angstrom": float(values.min()),
                "max_angstrom": float(values.max())}


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def window_profile(distance_px: np.ndarray, flat_radius_px: float, edge_px: float) -> np.ndarray:
    """RELION's ``raisedCosineMask``: 1 for ``r <= r0``, ``0.5 + 0.5 cos(pi (r - r0) / e)`` up to
    ``r0 + e``, 0 beyond (a hard sphere when ``e = 0``)."""
    r = np.asarray(distance_px, dtype=np.float64)
    out = (r <= flat_radius_px).astype(np.float64)
    if edge_px > 0:
        edge = (r > flat_radius_px) & (r < flat_radius_px + edge_px)
        out[edge] = 0.5 + 0.5 * np.cos(np.pi * (r[edge] - flat_radius_px) / edge_px)
    return out


def _window_cube(flat_radius_px: float, edge_px: float) -> tuple[np.ndarray, int]:
    """The window sampled on a cube ``(S, S, S)``, ``S = 2 h + 1``, centred on voxel ``h``.

    ``h = ceil(r0 + e)``: every voxel where the window is non-zero lies in the cube.
    """
    h = max(1, int(math.ceil(flat_radius_px + edge_px)))
    idx = np.arange(-h, h + 1, dtype=np.float64)
    r = np.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
    return window_profile(r, flat_radius_px, edge_px).astype(np.float32), h


def subbox_size(support: int) -> int:
    """``M``: the smallest even FFT-friendly (5-smooth) size that holds a cube of side ``support``."""
    m = max(4, int(support))
    while True:
        m = scipy.fft.next_fast_len(m, real=True)
        if m % 2 == 0:
            return m
        m += 1


def sampling_points(mask: np.ndarray, step_px: int) -> np.ndarray:
    """Grid points ``N//2 + j * step`` (every integer ``j`` that stays in the box) where ``mask > 0.5``.

    Returns
    -------
    numpy.ndarray
        ``(P, 3)`` int64 voxel indices ``(x, y, z)``, ordered by z, then y, then x.
    """
    n = mask.shape[0]
    c = n // 2
    axis = np.concatenate([np.arange(c, -1, -step_px)[::-1], np.arange(c + step_px, n, step_px)])
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    keep = mask[z, y, x] > INSIDE_MASK_THRESHOLD
    return np.stack([x[keep], y[keep], z[keep]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Windowed FSC
# --------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=True)
def _shell_sums(fa, fb, shell, mult, nshell, out):  # pragma: no cover - compiled
    """Per window ``b`` and shell ``s``: ``out[b, 0, s] = sum Re(fa conj fb)``, ``out[b, 1, s] =
    sum |fa|^2``, ``out[b, 2, s] = sum |fb|^2`` over the half transform, each coefficient counted
    ``mult[kx]`` times (full-transform counting). ``fa``, ``fb``: ``(B, M, M, M//2+1)`` complex."""
    nb, m, _, kx_n = fa.shape
    for b in numba.prange(nb):
        for s in range(nshell):
            out[b, 0, s] = 0.0
            out[b, 1, s] = 0.0
            out[b, 2, s] = 0.0
        for i in range(m):
            for j in range(m):
                for k in range(kx_n):
                    s = shell[i, j, k]
                    if s >= nshell:
                        continue
                    w = mult[k]
                    a = fa[b, i, j, k]
                    c = fb[b, i, j, k]
                    out[b, 0, s] += w * (a.real * c.real + a.imag * c.imag)
                    out[b, 1, s] += w * (a.real * a.real + a.imag * a.imag)
                    out[b, 2, s] += w * (c.real * c.real + c.imag * c.imag)


def _fsc_from_sums(sums: np.ndarray) -> np.ndarray:
    """FSC ``(B, nshell)`` from :func:`_shell_sums` output; 0 where a map has no power."""
    den = np.sqrt(sums[:, 1] * sums[:, 2])
    out = np.zeros_like(den)
    np.divide(sums[:, 0], den, out=out, where=den > 0)
    return out


def _hermitian_multiplicity(m: int) -> np.ndarray:
    mult = np.full(m // 2 + 1, 2.0)
    mult[0] = 1.0
    if m % 2 == 0:
        mult[m // 2] = 1.0
    return mult


def _windowed_fscs(map1: np.ndarray, map2: np.ndarray, points: np.ndarray, window: np.ndarray, h: int,
                   m: int) -> np.ndarray:
    """FSC of the two maps multiplied by the window centred on each point.

    Parameters
    ----------
    map1, map2
        Maps padded by ``h`` zeros on every side, ``(N + 2h,)*3`` float32.
    points
        ``(P, 3)`` ``(x, y, z)`` voxel indices in the unpadded box.
    window
        ``(S, S, S)`` window cube, ``S = 2h + 1``.
    m
        Sub-box size (``>= S``).

    Returns
    -------
    numpy.ndarray
        ``(P, m//2 + 1)`` float64 FSC of each window over sub-box shells ``0 .. m//2``.
    """
    s = 2 * h + 1
    nshell = m // 2 + 1
    shell = np.ascontiguousarray(shell_index(m))
    mult = _hermitian_multiplicity(m)
    # per point: two zero-padded real sub-boxes and their two transforms
    per_point = 2 * (m * m * (m // 2 + 1) * 8 + m ** 3 * 4)
    batch = max(1, min(len(points), _BATCH_BYTES // per_point))
    # The windowed cube sits in the corner of the sub-box and the rest stays zero: the padding only
    # refines the Fourier sampling, and the same shift of both maps leaves their FSC unchanged. The
    # buffers are allocated once, which avoids a fresh zero-padded copy per batch.
    buffers = [np.zeros((batch, m, m, m), dtype=np.float32) for _ in range(2)]
    out = np.empty((len(points), nshell))
    sums = np.empty((batch, 3, nshell))
    for start in range(0, len(points), batch):
        chunk = points[start:start + batch]
        nb = len(chunk)
        transforms = []
        for vol, buf in ((map1, buffers[0]), (map2, buffers[1])):
            for i, (x, y, z) in enumerate(chunk):
                # padded index = voxel index + h, so the cube centred on the point starts at it
                np.multiply(vol[z:z + s, y:y + s, x:x + s], window, out=buf[i, :s, :s, :s])
            transforms.append(scipy.fft.rfftn(buf[:nb], axes=(1, 2, 3), workers=_fft_workers()))
        _shell_sums(transforms[0], transforms[1], shell, mult, nshell, sums[:nb])
        del transforms
        out[start:start + nb] = _fsc_from_sums(sums[:nb])
    return out


# --------------------------------------------------------------------------------------------
# Local resolution
# --------------------------------------------------------------------------------------------

def _check_positive(value: float, option: str, example: str) -> float:
    v = float(value)
    if not finite_above(v):
        raise InputError(f"{option} {value:g} must be a finite positive number of Angstrom",
                         fix=f"e.g. {option} {example}")
    return v


def local_resolution(half1: np.ndarray, half2: np.ndarray, pixel_size_angstrom: float, mask: np.ndarray, *,
                     window_angstrom: float = DEFAULT_WINDOW_ANGSTROM, edge_angstrom: float | None = None,
                     sampling_angstrom: float | None = None, fsc_threshold: float = DEFAULT_FSC_THRESHOLD,
                     randomize_at_angstrom: float | None = DEFAULT_RANDOMIZE_AT_ANGSTROM,
                     seed: int = 0) -> LocresResult:
    """Local resolution map of two half maps (see the module docstring for the method).

    Parameters
    ----------
    half1, half2
        Unfiltered half maps ``(N, N, N)`` from independent halves of the data.
    pixel_size_angstrom
        Voxel size.
    mask
        ``(N, N, N)`` mask with values in [0, 1]: points are sampled where it is above 0.5, the map
        is written where it is above 0.
    window_angstrom
        Window diameter at half height, ``D``.
    edge_angstrom
        Width of the window's cosine edge; default ``D / 2`` (RELION's proportions). At most ``D``.
    sampling_angstrom
        Spacing of the sampling grid; default ``D / 2`` (RELION: 25 A for its 50 A window).
    fsc_threshold
        The windowed FSC threshold, in (0, 1).
    randomize_at_angstrom
        Phase-randomisation resolution of the mask correction; ``None`` or 0: no correction.
    seed
        Seed of the random phases.

    Returns
    -------
    LocresResult

    Raises
    ------
    InputError
        Different boxes, a mask without voxels above 0.5, a window that does not fit in the box or
        is under 4 voxels across, a threshold outside (0, 1).
    """
    a = check_volume(half1, "half map 1")
    b = check_volume(half2, "half map 2")
    if a.shape != b.shape:
        raise InputError(f"the half maps have different boxes {a.shape} and {b.shape}",
                         fix="use the two half maps of one reconstruction")
    m_full = check_mask(mask, a.shape)
    angpix = _check_positive(pixel_size_angstrom, "--angpix", "1.06")
    n = a.shape[0]
    diameter = _check_positive(window_angstrom, "--window-angstrom", "50")
    edge = diameter / 2.0 if edge_angstrom is None else float(edge_angstrom)
    if not (math.isfinite(edge) and 0 <= edge <= diameter):
        raise InputError(f"--window-edge-angstrom {edge:g} must lie between 0 and the window diameter {diameter:g}",
                         fix=f"e.g. --window-edge-angstrom {diameter / 2:g}")
    sampling = diameter / 2.0 if sampling_angstrom is None else _check_positive(sampling_angstrom,
                                                                                "--sampling-angstrom", "25")
    if not (math.isfinite(fsc_threshold) and 0 < fsc_threshold < 1):
        raise InputError(f"--fsc-threshold {fsc_threshold:g} must lie between 0 and 1",
                         fix="e.g. --fsc-threshold 0.143 (or 0.5)")
    if diameter < 4 * angpix:
        raise InputError(f"--window-angstrom {diameter:g} is under 4 voxels of {angpix:g} A",
                         fix=f"use a window of at least {4 * angpix:g} A, e.g. 3-4 times the expected resolution")
    if diameter > n * angpix:
        raise InputError(f"--window-angstrom {diameter:g} is larger than the box ({n * angpix:g} A)",
                         fix="use a smaller window")
    warnings: list[str] = []
    inside = m_full > INSIDE_MASK_THRESHOLD
    if not inside.any():
        raise InputError("the mask has no voxel above 0.5, so there is nothing to sample",
                         fix="use a mask of the particle (1 = protein), e.g. from `numba-recon mask`")

    flat_px = (diameter - edge) / 2.0 / angpix
    edge_px = edge / angpix
    window, h = _window_cube(flat_px, edge_px)
    m = subbox_size(2 * h + 1)
    step = max(1, int(math.floor(sampling / angpix + 0.5)))  # RELION: ROUND(locres_sampling / angpix)
    points = sampling_points(m_full, step)
    if len(points) == 0:
        # A mask thinner than the grid spacing: sample its voxel nearest the grid centre instead of failing.
        zyx = np.argwhere(inside)
        centre = np.argmin(((zyx - n // 2) ** 2).sum(axis=1))
        points = zyx[centre][None, ::-1].astype(np.int64)
        _warn(warnings, f"no grid point ({sampling:g} A spacing) falls inside the mask: one point sampled; "
                        "use a smaller --sampling-angstrom")
    logger.info("local resolution: %d points, window %.1f A (edge %.1f A), sub-box %d, step %d voxels",
                len(points), diameter, edge, m, step)

    def pad(v: np.ndarray) -> np.ndarray:
        return np.pad(np.asarray(v, dtype=np.float32), h)

    fsc_masked = _windowed_fscs(pad(a), pad(b), points, window, h, m)
    fsc_true = fsc_masked
    shell_random_full = None
    if randomize_at_angstrom:
        rand_res = _check_positive(randomize_at_angstrom, "--randomize-at-angstrom", "25")
        shell_random_full = int(n * angpix / rand_res)  # RELION truncates here
        if not 1 <= shell_random_full <= n // 2:
            _warn(warnings, f"--randomize-at-angstrom {rand_res:g} lies outside shells 1..{n // 2} of the box: "
                            "no phase-randomisation correction")
            shell_random_full = None
        else:
            # one pair of padded maps at a time keeps the peak memory at two padded boxes
            rng = np.random.default_rng(seed)
            random1 = pad(irfft3(randomize_phases_from_ft(rfft3(a), n, shell_random_full, rng), n))
            random2 = pad(irfft3(randomize_phases_from_ft(rfft3(b), n, shell_random_full, rng), n))
            fsc_random = _windowed_fscs(random1, random2, points, window, h, m)
            del random1, random2
            shell_correct_from = int(m * angpix / rand_res) + 2
            # RELION calculateFSCtrue: "Sometimes FSC at origin becomes -1!"
            fsc_masked[fsc_masked[:, 0] <= 0, 0] = 1.0
            fsc_random[fsc_random[:, 0] <= 0, 0] = 1.0
            fsc_true = fsc_masked.copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                corrected = (fsc_masked - fsc_random) / (1.0 - fsc_random)
            fsc_true[:, shell_correct_from:] = corrected[:, shell_correct_from:]

    shells = np.array([last_shell_above(curve, fsc_threshold) for curve in fsc_true], dtype=np.int64)
    # shell 0: below the threshold at shell 1; the coarsest resolution the sub-box can express
    res = m * angpix / np.maximum(shells, 1)
    unresolved = int(np.count_nonzero(shells == 0))
    if unresolved:
        _warn(warnings, f"{unresolved} of {len(points)} windows have FSC < {fsc_threshold:g} already at shell 1 "
                        f"(written as {m * angpix:.1f} A, the sub-box size): no signal there, or a window "
                        "too small for that resolution")

    locres = _spread(points, res, window, h, n, m_full > 0)
    return LocresResult(box_size=n, pixel_size_angstrom=angpix, locres=locres, inside=inside,
                        average=(0.5 * (a + b)).astype(np.float32), points=points,
                        point_resolution_angstrom=res, point_shell=shells, window_diameter_angstrom=diameter,
                        window_edge_angstrom=edge, sampling_angstrom=sampling, sampling_px=step, subbox_size=m,
                        fsc_threshold=float(fsc_threshold),
                        randomize_at_angstrom=float(randomize_at_angstrom) if shell_random_full else None,
                        warnings=warnings)


def _warn(result_warnings: list[str], message: str) -> None:
    logger.warning(message)
    result_warnings.append(message)


def _spread(points: np.ndarray, res: np.ndarray, window: np.ndarray, h: int, n: int,
            keep: np.ndarray) -> np.ndarray:
    """Window-weighted harmonic mean of the point resolutions at every voxel where ``keep``.

    ``locres(x) = sum_p w_p(x) / sum_p w_p(x) / res_p`` (RELION averages spatial frequency); voxels
    in ``keep`` that no window reaches take the nearest point's value; voxels outside ``keep`` are 0.
    """
    s = 2 * h + 1
    shape = (n + 2 * h,) * 3
    # float32: a voxel sums at most a few tens of windows, and float64 would double the memory of
    # two padded boxes
    freq_sum = np.zeros(shape, dtype=np.float32)
    weight_sum = np.zeros(shape, dtype=np.float32)
    for (x, y, z), r in zip(points, res):
        freq_sum[z:z + s, y:y + s, x:x + s] += window / r
        weight_sum[z:z + s, y:y + s, x:x + s] += window
    inner = (slice(h, h + n),) * 3
    freq_sum, weight_sum = freq_sum[inner], weight_sum[inner]
    out = np.zeros((n, n, n), dtype=np.float64)
    reached = keep & (weight_sum > 0)
    out[reached] = weight_sum[reached] / freq_sum[reached]
    missed = keep & ~reached
    if missed.any():
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(points[:, ::-1]).query(np.argwhere(missed))
        out[missed] = res[nearest]
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def check_locres_outputs(out_dir: str | os.PathLike, overwrite: bool) -> dict[str, Path]:
    """Check (and create) the output folder; return the output paths by file name.

    Raises :class:`OutputError` when the folder is a file or not writable, or when an output exists
    and ``overwrite`` is False, so that nothing is computed in vain.
    """
    from numba_recon.evaluate.postprocess import check_output_files

    return check_output_files(out_dir, LOCRES_FILES, overwrite)


def locres_summary(result: LocresResult, half1_path: str | os.PathLike, half2_path: str | os.PathLike,
                   mask_path: str | os.PathLike, command: str | None = None) -> dict[str, object]:
    """The content of ``locres_summary.json``."""
    summary: dict[str, object] = dict(result.statistics())
    summary.update({
        "fsc_threshold": result.fsc_threshold,
        "window_diameter_angstrom": result.window_diameter_angstrom,
        "window_edge_angstrom": result.window_edge_angstrom,
        "sampling_angstrom": result.sampling_angstrom,
        "sampling_px": result.sampling_px,
        "subbox_size": result.subbox_size,
        "shell_width_inv_angstrom": result.shell_width_inv_angstrom,
        "randomize_at_angstrom": result.randomize_at_angstrom,
        "n_sampling_points": int(len(result.points)),
        "n_unresolved_points": int(np.count_nonzero(result.point_shell == 0)),
        "n_voxels_inside_mask": int(np.count_nonzero(result.inside)),
        "box_size": result.box_size,
        "pixel_size_angstrom": result.pixel_size_angstrom,
        "half1": os.fspath(half1_path),
        "half2": os.fspath(half2_path),
        "mask": os.fspath(mask_path),
        "command": command,
        "warnings": list(result.warnings),
    })
    return summary


def locres_csv_text(result: LocresResult) -> str:
    """``x,y,z,resolution_angstrom``: one row per sampling point (voxel indices, x = column)."""
    lines = ["x,y,z,resolution_angstrom"]
    lines += [f"{x},{y},{z},{r:.4f}" for (x, y, z), r in zip(result.points, result.point_resolution_angstrom)]
    return "\n".join(lines) + "\n"


def plot_locres_histogram(result: LocresResult, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Histogram of the local resolution of the voxels inside the mask, median marked."""
    values = result.locres[result.inside]
    stats = result.statistics()
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(stats["median_angstrom"], color="tab:red", linestyle="--", linewidth=1.2,
               label=f"median {stats['median_angstrom']:.2f} \u00c5")
    ax.set_xlabel("local resolution (\u00c5)")
    ax.set_ylabel("voxels inside the mask")
    ax.set_title(f"local resolution: 5-95 % {stats['percentile_5_angstrom']:.2f}-"
                 f"{stats['percentile_95_angstrom']:.2f} \u00c5 (FSC = {result.fsc_threshold:g})", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, overwrite)


def plot_locres_slices(result: LocresResult, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Central slices (z, y, x) of the average map in grey, coloured by local resolution inside
    the mask, with a colour bar (blue: best resolved)."""
    n = result.box_size
    c = n // 2
    stats = result.statistics()
    vmin, vmax = stats["percentile_5_angstrom"], stats["percentile_95_angstrom"]
    if not vmax > vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    fig = _new_figure(11.0, 4.0)
    axes = fig.subplots(1, 3)
    slices = [("xy, z = %d" % c, (c, slice(None), slice(None)), "x", "y"),
              ("xz, y = %d" % c, (slice(None), c, slice(None)), "x", "z"),
              ("yz, x = %d" % c, (slice(None), slice(None), c), "y", "z")]
    colour = None
    for ax, (title, sel, xlabel, ylabel) in zip(axes, slices):
        ax.imshow(result.average[sel], cmap="gray", origin="lower", interpolation="nearest")
        overlay = np.ma.masked_where(result.locres[sel] <= 0, result.locres[sel])
        colour = ax.imshow(overlay, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.55, origin="lower",
                           interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    bar = fig.colorbar(colour, ax=list(axes), shrink=0.85)
    bar.set_label("local resolution (\u00c5)")
    fig.suptitle(f"local resolution, median {stats['median_angstrom']:.2f} \u00c5", fontsize=10)
    return save_figure(fig, path, overwrite)


def write_locres(result: LocresResult, out_dir: str | os.PathLike, half1_path: str | os.PathLike,
                 half2_path: str | os.PathLike, mask_path: str | os.PathLike, command: str | None = None,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write ``locres.mrc``, ``locres_histogram.png``, ``locres.csv``, ``locres_summary.json`` and
    ``locres_sliced.png`` into ``out_dir``.

    Every file is first written under a temporary name; all are renamed into place only after the
    last one is complete, so an error leaves no partial output.

    Returns
    -------
    dict
        File name -> path written.
    """
    from numba_recon.io.mrc import write_volume

    targets = check_locres_outputs(out_dir, overwrite)
    summary = locres_summary(result, half1_path, half2_path, mask_path, command)
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_output(p, overwrite=overwrite)) for name, p in targets.items()}
        write_volume(tmp["locres.mrc"], result.locres, result.pixel_size_angstrom, overwrite=True)
        tmp["locres.csv"].write_text(locres_csv_text(result), encoding="utf-8")
        tmp["locres_summary.json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot_locres_histogram(result, tmp["locres_histogram.png"])
        plot_locres_slices(result, tmp["locres_sliced.png"])
    return targets
