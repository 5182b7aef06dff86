"""Create a soft-edged mask from a map (relion_mask_create semantics).

The map is optionally low-pass filtered (--lowpass, Angstrom), binarised at --threshold (voxels >=
threshold are inside), the binary mask is extended by --extend pixels (negative shrinks; a voxel
joins if an inside voxel is at distance < extend), and a raised-cosine edge 0.5 + 0.5 cos(pi d / w)
of --soft-edge pixels is added outside it. --threshold auto picks the solvent median plus the larger
of 5 robust standard deviations of the solvent (box corners) and 20 % of the peak height, and prints
the value it chose. Low-pass noisy maps (e.g. --lowpass 15) before an automatic threshold.

\b
Examples:
  numba-recon mask run_class001.mrc -o mask.mrc --threshold 0.02 --extend 3 --soft-edge 6
  numba-recon mask run_class001.mrc -o mask.mrc --threshold auto --lowpass 15 --extend 3 --soft-edge 8
"""

from __future__ import annotations

import logging
from typing import Any

import click
import numpy as np

from numba_recon.cli._common import (FINITE_FLOAT, NONNEGATIVE_FLOAT, RESOLUTION_ANGSTROM, OptionValueError,
                                     angpix_option, check_output_file, handle_errors, option_name, overwrite_option,
                                     read_map)

logger = logging.getLogger(__name__)


class ThresholdType(click.ParamType):
    """A finite density threshold, or ``"auto"`` (chosen from the map). Not None for auto: click
    8.1 takes None for a missing value of a required option."""

    name = "T|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        number, why = FINITE_FLOAT.parse(value)
        if why is not None:
            got = repr(value) if why == "not a number" else str(value).strip()
            raise OptionValueError(f"must be a finite number or auto (got {got}: {why}); e.g. "
                                   f"{option_name(param)} 0.02 or {option_name(param)} auto", ctx=ctx, param=param)
        return number


@click.command("mask", help=__doc__)
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output mask (.mrc).")
@click.option("--threshold", type=ThresholdType(), required=True, metavar="T|auto",
              help="Density threshold of the initial binary mask, or 'auto'.")
@click.option("--extend", "extend_px", type=FINITE_FLOAT, default=3.0, show_default=True,
              help="Extend (or, if negative, shrink) the binary mask by this many pixels.")
@click.option("--soft-edge", "soft_edge_px", type=NONNEGATIVE_FLOAT, default=3.0, show_default=True,
              help="Width of the raised-cosine soft edge in pixels (0: binary mask).")
@click.option("--lowpass", "lowpass_angstrom", type=RESOLUTION_ANGSTROM, default=None,
              help="Low-pass filter the map at this resolution (Angstrom) first.")
@angpix_option
@overwrite_option
@handle_errors
def mask(map_path: str, output: str, threshold: float | str, extend_px: float, soft_edge_px: float,
         lowpass_angstrom: float | None, angpix: float | None, overwrite: bool) -> None:
    from numba_recon.evaluate.filters import lowpass
    from numba_recon.evaluate.mask import auto_threshold, create_mask
    from numba_recon.io.mrc import write_volume

    out = check_output_file(output, overwrite)
    volume, pixel = read_map(map_path, angpix)
    if lowpass_angstrom is not None:
        volume = lowpass(volume, lowpass_angstrom, pixel)
        click.echo(f"low-pass filtered at {lowpass_angstrom:g} A ({pixel:g} A/px)")
    if threshold == "auto":
        threshold = auto_threshold(volume)
        click.echo(f"threshold {threshold:.6g} (auto: solvent median + max(5 robust sigma, 20% of the peak "
                   f"above it); map range [{float(volume.min()):.4g}, {float(volume.max()):.4g}])")
    else:
        click.echo(f"threshold {threshold:.6g}")
    result = create_mask(volume, threshold, extend_px, soft_edge_px)
    inside = float(np.mean(result >= 0.5))
    faces = (result[0], result[-1], result[:, 0], result[:, -1], result[:, :, 0], result[:, :, -1])
    if any(float(f.max()) > 0 for f in faces):
        logger.warning("the mask reaches the edge of the box: the particle may be cut; raise the threshold "
                       "or use a bigger box")
    write_volume(out, result, pixel, overwrite=overwrite)
    click.echo(f"mask: {100 * inside:.2f}% of the box at >= 0.5, extend {extend_px:g} px, soft edge "
               f"{soft_edge_px:g} px -> {out}")
