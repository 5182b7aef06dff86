"""Fourier shell correlation of two maps, and the resolution at FSC = 0.143 and 0.5.

Shells are RELION's (ROUND(|k|)); the resolution is the last shell before the FSC first drops
below the threshold (relion_postprocess's rule: a later rebound is ignored). With --mask both maps
are multiplied by the mask first (no phase-randomisation correction: use `numba-recon postprocess`
for the corrected FSC). The voxel size comes from the MRC header unless --angpix is given.

\b
Examples:
  numba-recon fsc run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc -o fsc.csv --plot fsc.png
  numba-recon fsc map.mrc truth.mrc --mask mask.mrc --angpix 1.06
"""

from __future__ import annotations

import logging
import math
import os

import click
import numpy as np

from numba_recon.cli._common import angpix_option, check_output_file, handle_errors, overwrite_option
from numba_recon.errors import InputError, InputFileError

logger = logging.getLogger(__name__)


def check_angpix(angpix: float | None) -> None:
    """Refuse an ``--angpix`` that is not a finite positive number (``None`` means: from the header).

    Written as ``not (finite and > 0)``: NaN and infinity would pass a plain ``> 0`` test.
    """
    if angpix is not None and not (math.isfinite(angpix) and angpix > 0):
        raise InputError(f"--angpix {angpix} must be a finite positive number of Angstrom", None,
                         "e.g. --angpix 1.06")


def read_map(path: str, angpix: float | None) -> tuple[np.ndarray, float]:
    """Read a cubic map and its voxel size (``angpix`` overrides the header).

    Raises
    ------
    InputError
        ``angpix`` is not a finite positive number.
    InputFileError
        Unreadable or non-cubic map, or no valid voxel size in the header and no ``--angpix``.
    """
    from numba_recon.io.mrc import read_volume

    check_angpix(angpix)
    volume, header_angpix = read_volume(path)
    if angpix is not None:
        return volume, float(angpix)
    if header_angpix is None or not (math.isfinite(header_angpix) and header_angpix > 0):
        raise InputFileError("the header does not give the voxel size", path, "pass --angpix")
    return volume, float(header_angpix)


def read_map_pair(path1: str, path2: str, angpix: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Read two maps that must share box and voxel size (the header sizes are compared unless
    ``angpix`` is given, which then applies to both)."""
    map1, angpix1 = read_map(path1, angpix)
    map2, angpix2 = read_map(path2, angpix)
    if map1.shape != map2.shape:
        raise InputFileError(f"box {map2.shape[0]} differs from the box {map1.shape[0]} of {path1}", path2,
                             "compare maps of the same reconstruction (same box size)")
    if abs(angpix1 - angpix2) > 1e-3 * angpix1:
        raise InputFileError(f"voxel size {angpix2:g} A differs from {angpix1:g} A of {path1}", path2,
                             "compare maps with the same voxel size, or pass --angpix to override both headers")
    return map1, map2, angpix1


def read_mask(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read a mask that must match ``shape`` and hold values in [0, 1]."""
    from numba_recon.evaluate.fsc import check_mask
    from numba_recon.io.mrc import read_volume

    mask, _ = read_volume(path)
    if mask.shape != tuple(shape):
        raise InputFileError(f"mask box {mask.shape[0]} differs from the map box {shape[0]}", path,
                             "make the mask from a map of the same box (numba-recon mask)")
    try:
        return check_mask(mask, shape)
    except InputError as err:
        raise InputFileError(err.problem, path, err.fix) from None


@click.command("fsc", help=__doc__)
@click.argument("map1", type=click.Path(dir_okay=False))
@click.argument("map2", type=click.Path(dir_okay=False))
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="Multiply both maps by this mask (values in [0, 1]) first.")
@angpix_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the FSC table as CSV (spectral_index, resolution_inv_angstrom, resolution_angstrom, fsc).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write an FSC plot (PNG).")
@overwrite_option
@handle_errors
def fsc(map1: str, map2: str, mask_path: str | None, angpix: float | None, output: str | None,
        plot_path: str | None, overwrite: bool) -> None:
    from numba_recon.evaluate.fsc import FSCCurve, last_shell_above, plot_fsc

    check_angpix(angpix)
    if output and plot_path and os.path.abspath(output) == os.path.abspath(plot_path):
        raise InputError("-o and --plot name the same file", None, "give two different file names")
    out_csv = check_output_file(output, overwrite) if output else None
    out_png = check_output_file(plot_path, overwrite) if plot_path else None
    a, b, pixel = read_map_pair(map1, map2, angpix)
    mask = read_mask(mask_path, a.shape) if mask_path else None
    curve = FSCCurve.from_maps(a, b, pixel, mask)
    res143 = curve.resolution(0.143)
    res05 = curve.resolution(0.5)
    n = a.shape[0]
    logger.info("resolution by RELION's rule: the last shell before the FSC first drops below the threshold")
    for threshold, res in ((0.143, res143), (0.5, res05)):
        last = last_shell_above(curve.fsc, threshold)
        note = ""
        if last == 0:
            note = " (below the threshold already at shell 1: no resolution, the box size is shown)"
        elif last == n // 2:
            note = " (never drops below the threshold: Nyquist)"
        click.echo(f"FSC {threshold:<5g}: {res:.2f} A (shell {last} of {n // 2}){note}")
    if out_csv is not None:
        curve.to_csv(out_csv, overwrite=overwrite)
        click.echo(f"wrote {out_csv}")
    if out_png is not None:
        label = "masked maps" if mask is not None else "maps"
        plot_fsc({label: curve.fsc}, n, pixel, out_png, resolution=res143,
                 title=f"FSC of {os.path.basename(map1)} and {os.path.basename(map2)}: {res143:.2f} \u00c5 at 0.143",
                 overwrite=overwrite)
        click.echo(f"wrote {out_png}")
