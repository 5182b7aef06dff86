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

import click

from numba_recon.cli._common import (NONNEGATIVE_INT, RESOLUTION_ANGSTROM, angpix_option, check_output_file,
                                     handle_errors, overwrite_option, read_map)

logger = logging.getLogger(__name__)


@click.command("lowpass", help=__doc__)
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("--resolution", "resolution_angstrom", type=RESOLUTION_ANGSTROM, required=True,
              help="Filter resolution in Angstrom.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Filtered map (.mrc).")
@click.option("--edge-width", "edge_width_shells", type=NONNEGATIVE_INT, default=2, show_default=True,
              help="Width of the cosine edge in Fourier shells.")
@angpix_option
@overwrite_option
@handle_errors
def lowpass(map_path: str, resolution_angstrom: float, output: str, edge_width_shells: int,
            angpix: float | None, overwrite: bool) -> None:
    from numba_recon.evaluate.filters import lowpass as lowpass_filter
    from numba_recon.io.mrc import write_volume

    out = check_output_file(output, overwrite)
    volume, pixel = read_map(map_path, angpix)
    if resolution_angstrom < 2 * pixel:
        logger.warning("--resolution %g A is beyond Nyquist (%g A): only the corners of Fourier space are removed",
                       resolution_angstrom, 2 * pixel)
    filtered = lowpass_filter(volume, resolution_angstrom, pixel, edge_width_shells)
    write_volume(out, filtered, pixel, overwrite=overwrite)
    click.echo(f"low-pass filtered at {resolution_angstrom:g} A ({pixel:g} A/px, edge {edge_width_shells} shells) "
               f"-> {out}")
