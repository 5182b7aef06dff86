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
import os

import click

from numba_recon.cli._common import (angpix_option, check_output_file, handle_errors, overwrite_option, read_map_pair,
                                     read_mask)
from numba_recon.errors import InputError

logger = logging.getLogger(__name__)


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
