"""Soft-edged masks: ``relion_mask_create`` semantics computed with Euclidean distance transforms.

RELION's ``autoMask`` (``src/mask.cpp``) searches a cube around every voxel, which costs
``O(N^3 w^3)`` and takes hours for wide soft edges. The same numbers follow from the exact
Euclidean distance transform (``scipy.ndimage.distance_transform_edt``) in ``O(N^3)``:

1. binary mask ``B = map >= threshold`` (after an optional low-pass of the map);
2. extend by ``e > 0`` pixels: a 0-voxel becomes 1 if a 1-voxel lies at distance ``d < e``;
   shrink (``e < 0``): a 1-voxel becomes 0 if a 0-voxel lies at ``d < |e|``;
3. soft edge of ``w`` pixels: a remaining 0-voxel at distance ``d < w`` from the nearest 1-voxel
   gets ``0.5 + 0.5 cos(pi d / w)``; all others stay 0.

Distances are between voxel centres and only voxels inside the box count, as in RELION.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from numba_recon.errors import InputError, InputFileError
from numba_recon.evaluate.fsc import check_volume

__all__ = ["create_mask", "auto_threshold", "spherical_mask", "AUTO_THRESHOLD_NOISE_SIGMAS",
           "AUTO_THRESHOLD_PEAK_FRACTION"]

#: Solvent-noise margin of :func:`auto_threshold`, in robust standard deviations of the solvent.
AUTO_THRESHOLD_NOISE_SIGMAS = 5.0
#: Fraction of the robust peak height above the solvent level used by :func:`auto_threshold`.
AUTO_THRESHOLD_PEAK_FRACTION = 0.2


def _distance_to(binary_target: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) from every voxel to the nearest ``True`` voxel of the target."""
    from scipy import ndimage

    if not binary_target.any():
        return np.full(binary_target.shape, np.inf)
    # distance_transform_edt measures the distance from non-zero voxels to the nearest zero voxel
    return ndimage.distance_transform_edt(~binary_target)


def _around(binary: np.ndarray, margin_px: float) -> tuple[slice, ...]:
    """Bounding box of the ``True`` voxels grown by ``margin_px`` (+1) on every side, clipped to the box.

    Every voxel within ``margin_px`` of a ``True`` voxel lies inside it, so distance transforms of
    the crop are exact wherever they are needed; this makes masks of compact particles in large
    boxes several times faster.
    """
    margin = int(np.ceil(margin_px)) + 1
    slices = []
    for axis in range(binary.ndim):
        others = tuple(a for a in range(binary.ndim) if a != axis)
        nz = np.flatnonzero(binary.any(axis=others))
        slices.append(slice(max(0, int(nz[0]) - margin), min(binary.shape[axis], int(nz[-1]) + margin + 1)))
    return tuple(slices)


def create_mask(volume: np.ndarray, threshold: float, extend_px: float = 0, soft_edge_px: float = 0,
                lowpass_angstrom: float | None = None,
                pixel_size_angstrom: float | None = None) -> np.ndarray:
    """Make a mask like ``relion_mask_create`` (threshold, extend or shrink, raised-cosine edge).

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.
    threshold
        Density at or above which a voxel is inside the initial binary mask (RELION
        ``--ini_threshold``); see :func:`auto_threshold` for a data-driven choice.
    extend_px
        Grow (positive) or shrink (negative) the binary mask by this many pixels, strict ``<``
        distance test (``--extend_inimask``).
    soft_edge_px
        Width of the raised-cosine edge in pixels (``--width_soft_edge``); 0 gives a binary mask.
    lowpass_angstrom
        Low-pass the map at this resolution first (RELION ``--lowpass``, 2-shell cosine edge);
        needs ``pixel_size_angstrom``.
    pixel_size_angstrom
        Voxel size, needed with ``lowpass_angstrom``.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)`` with values in [0, 1].

    Raises
    ------
    InputError
        No voxel reaches the threshold, or a low-pass without a pixel size.

    Notes
    -----
    At most two exact distance transforms, each restricted to the bounding box of the mask plus
    the extension or edge width. Box 256 with extend 3 and soft edge 6: 0.8 s for a compact particle,
    5.2 s when the mask spans the whole box (docs/postprocessing.md).
    """
    v = check_volume(volume)
    if lowpass_angstrom is not None:
        if pixel_size_angstrom is None:
            raise InputError("a low-pass before masking needs the pixel size",
                             fix="pass --angpix or use a map whose header has the voxel size")
        from numba_recon.evaluate.filters import lowpass

        v = lowpass(v, lowpass_angstrom, pixel_size_angstrom)
    binary = v >= float(threshold)
    if not binary.any():
        raise InputError(f"no voxel reaches the threshold {float(threshold):.6g} (map maximum {float(v.max()):.6g})",
                         fix="lower --threshold or use --threshold auto")
    extend = float(extend_px)
    if extend > 0:
        crop = _around(binary, extend)
        binary[crop] = _distance_to(binary[crop]) < extend
    elif extend < 0:
        crop = _around(binary, -extend)
        inside = binary[crop]
        binary[crop] = inside & ~(_distance_to(~inside) < -extend)
        if not binary.any():
            raise InputError(f"shrinking by {-extend:g} pixels removes the whole mask",
                             fix="shrink less or lower the threshold")
    mask = binary.astype(np.float32)
    width = float(soft_edge_px)
    if width > 0:
        crop = _around(binary, width)
        d = _distance_to(binary[crop])
        edge = (~binary[crop]) & (d < width)
        sub = mask[crop]
        sub[edge] = (0.5 + 0.5 * np.cos(np.pi * d[edge] / width)).astype(np.float32)
        mask[crop] = sub
    elif width < 0:
        raise InputError(f"soft edge width {width:g} must not be negative", fix="use e.g. --soft-edge 6")
    return mask


def auto_threshold(volume: np.ndarray) -> float:
    """A binarisation threshold that separates a centred particle from the solvent.

    ``threshold = mu + max(5 sigma, 0.2 (p - mu))`` where

    - ``mu`` and ``sigma`` are the median and the robust standard deviation (1.4826 x median
      absolute deviation) of the voxels outside the sphere inscribed in the box. Those box corners
      (48 % of the volume) are solvent for any particle that fits the box, and median/MAD are not
      pulled by density that does reach into them;
    - ``p`` is the 99.99th percentile of the whole map, a peak height that ignores single hot
      voxels.

    The ``5 sigma`` term keeps solvent noise out of the mask (a Gaussian exceeds 5 sigma with
    probability 3e-7, under one voxel of a 128^3 box); the ``20 %`` term keeps the threshold on
    the particle when the map is noise-free or strongly low-passed, where ``sigma`` vanishes (a
    looser version of cryoDRGN's half of the 99.99th percentile: the mask is extended and softened
    afterwards, and too tight a mask biases the masked FSC). Low-pass a noisy map first
    (``create_mask(..., lowpass_angstrom=15)``) so that the noise term does not dominate.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map.

    Returns
    -------
    float
        The threshold in the map's density units.
    """
    v = check_volume(volume)
    n = v.shape[0]
    c = n // 2
    idx = np.arange(n) - c
    r2 = idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2
    outside = v[r2 > c * c]
    if outside.size < 8:
        raise InputError(f"box {n} is too small to estimate the solvent level", fix="give the threshold explicitly")
    mu = float(np.median(outside))
    sigma = 1.4826 * float(np.median(np.abs(outside - mu)))
    peak = float(np.percentile(v, 99.99))
    if not peak > mu:
        raise InputError("the map has no density above its solvent level",
                         fix="check the map (is its contrast inverted?) or give the threshold explicitly")
    return mu + max(AUTO_THRESHOLD_NOISE_SIGMAS * sigma, AUTO_THRESHOLD_PEAK_FRACTION * (peak - mu))


def spherical_mask(box: int, radius_px: float, soft_edge_px: float = 0) -> np.ndarray:
    """A sphere centred on voxel ``(N//2, N//2, N//2)`` with a raised-cosine edge.

    1 for distance ``r <= radius_px``, ``0.5 + 0.5 cos(pi (r - radius_px) / soft_edge_px)`` for
    ``radius_px < r < radius_px + soft_edge_px``, 0 beyond.

    Parameters
    ----------
    box
        Box size ``N``.
    radius_px
        Radius of the flat top, pixels.
    soft_edge_px
        Width of the cosine edge, pixels (0: hard edge).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N, N)``.
    """
    n = int(box)
    if n < 1:
        raise InputError(f"box {box} must be positive", fix="pass the box size in voxels")
    if not float(radius_px) >= 0 or not float(soft_edge_px) >= 0:
        raise InputError(f"radius {radius_px} and soft edge {soft_edge_px} must not be negative",
                         fix="pass sizes in pixels")
    idx = np.arange(n, dtype=np.float64) - n // 2
    r = np.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
    mask = (r <= radius_px).astype(np.float64)
    width = float(soft_edge_px)
    if width > 0:
        edge = (r > radius_px) & (r < radius_px + width)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * (r[edge] - radius_px) / width)
    return mask.astype(np.float32)


def validate_mask(path: str | os.PathLike, box_size: int, pixel_size_angstrom: float) -> np.ndarray:
    """Read the post-processing mask of a run and check that it fits the reconstruction.

    Call it before the first epoch, so a wrong mask stops the run at once instead of at the end.

    Parameters
    ----------
    path
        MRC mask (values in [0, 1], 1 = particle), e.g. from ``numba-recon mask``.
    box_size, pixel_size_angstrom
        The particles' box and pixel size.

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` float32 mask.

    Raises
    ------
    InputFileError
        Missing or unreadable file, another box or voxel size, values outside [0, 1], or an empty
        mask; the message names the file and the fix.
    """
    from numba_recon.evaluate.fsc import check_mask
    from numba_recon.io.mrc import read_volume

    p = Path(path)
    if not p.is_file():
        raise InputFileError("mask file not found", p, "check the --mask path")
    mask, voxel = read_volume(p)
    n = int(box_size)
    if mask.shape != (n, n, n):
        raise InputFileError(f"mask box {mask.shape[0]} differs from the particle box {n}", p,
                             "make the mask from a map of this reconstruction's box (numba-recon mask), or resample it")
    angpix = float(pixel_size_angstrom)
    if voxel > 0 and abs(voxel - angpix) > 1e-3 * angpix:
        raise InputFileError(f"mask voxel size {voxel:.4f} A differs from the particle pixel size {angpix:.4f} A", p,
                             "make the mask at the particles' pixel size")
    try:
        mask = check_mask(mask, mask.shape)
    except InputError as err:
        raise InputFileError(err.problem, p, err.fix) from None
    if not float(mask.max()) > 0:
        raise InputFileError("mask is empty (all zero)", p, "lower the threshold when making the mask")
    return mask
