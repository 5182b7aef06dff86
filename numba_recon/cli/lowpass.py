"""Low-pass filter a map with RELION's raised-cosine edge.

The edge is centred on shell ROUND(N * angpix / resolution) and spans --edge-width shells
(RELION's --filter_edge_width, default 2): frequencies one shell below are kept, one shell above
removed. The voxel size comes from the MRC header unless --angpix is given.

\b
Example:
  numba-recon lowpass run_class001.mrc --resolution 8 -o run_class001_lp8.mrc
"""

from __future__ import annotations

import logging
import math

import click

from numba_recon.cli._common import angpix_option, check_output_file, handle_errors, overwrite_option
from numba_recon.errors import InputError

logger = logging.getLogger(__name__)


@click.command("lowpass", help=__doc__)
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("--resolution", "resolution_angstrom", type=float, required=True,
              help="Filter resolution in Angstrom.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Filtered map (.mrc).")
@click.option("--edge-width", "edge_width_shells", type=int, default=2, show_default=True,
              help="Width of the cosine edge in Fourier shells.")
@angpix_option
@overwrite_option
@handle_errors
def lowpass(map_path: str, resolution_angstrom: float, output: str, edge_width_shells: int,
            angpix: float | None, overwrite: bool) -> None:
    from numba_recon.cli.fsc import check_angpix, read_map
    from numba_recon.evaluate.filters import lowpass as lowpass_filter
    from numba_recon.io.mrc import write_volume

    # ``not (finite and > 0)``: NaN and infinity would pass a plain ``> 0`` test.
    if not (math.isfinite(resolution_angstrom) and resolution_angstrom > 0):
        raise InputError(f"--resolution {resolution_angstrom:g} must be a finite positive number of Angstrom", None,
                         "e.g. --resolution 8")
    if edge_width_shells < 0:
        raise InputError(f"--edge-width {edge_width_shells} must not be negative", None, "e.g. --edge-width 2")
    check_angpix(angpix)
    out = check_output_file(output, overwrite)
    volume, pixel = read_map(map_path, angpix)
    if resolution_angstrom < 2 * pixel:
        logger.warning("--resolution %g A is beyond Nyquist (%g A): only the corners of Fourier space are removed",
                       resolution_angstrom, 2 * pixel)
    filtered = lowpass_filter(volume, resolution_angstrom, pixel, edge_width_shells)
    write_volume(out, filtered, pixel, overwrite=overwrite)
    click.echo(f"low-pass filtered at {resolution_angstrom:g} A ({pixel:g} A/px, edge {edge_width_shells} shells) "
               f"-> {out}")
