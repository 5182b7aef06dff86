"""Local resolution from windowed half-map FSCs, as relion_postprocess --locres.

At points on a grid (--sampling-angstrom, default half the window) inside the mask (> 0.5), both
half maps are multiplied by a soft sphere (diameter --window-angstrom at half height, cosine edge
--window-edge-angstrom, default half the diameter: RELION's 50 A window with 25 A edge), the FSC of
the two windowed maps is corrected for the window by phase randomisation beyond
--randomize-at-angstrom (0 turns it off), and the local resolution is the last shell before the
FSC first drops below --fsc-threshold. Every voxel of the mask gets the window-weighted mean of
the spatial frequencies of the windows that reach it; voxels outside the mask are 0. The mask is
required. Outputs in DIR: locres.mrc, locres.csv (sampling points), locres_summary.json,
locres_histogram.png, locres_sliced.png.

\b
Examples:
  numba-recon locres run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc --mask mask.mrc -o locres
  numba-recon locres half1.mrc half2.mrc --mask mask.mrc -o locres --window-angstrom 30 --fsc-threshold 0.5
"""

from __future__ import annotations

import shlex

import click

from numba_recon.cli._common import (FSC_VALUE, NONNEGATIVE_FLOAT, POSITIVE_FLOAT, SEED, angpix_option,
                                     handle_errors, overwrite_option, read_map_pair, read_mask)
from numba_recon.errors import InputError


@click.command("locres", help=__doc__)
@click.argument("half1", type=click.Path(dir_okay=False))
@click.argument("half2", type=click.Path(dir_okay=False))
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="Soft mask (values in [0, 1]) of the particle, e.g. from `numba-recon mask` (required).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Output folder.")
@click.option("--window-angstrom", type=POSITIVE_FLOAT, default=50.0, show_default=True,
              help="Diameter of the spherical window at half height (A); use 3-4 times the worst expected "
                   "local resolution.")
@click.option("--window-edge-angstrom", type=NONNEGATIVE_FLOAT, default=None,
              help="Width of the window's cosine edge (A) [default: half the window diameter].")
@click.option("--sampling-angstrom", type=POSITIVE_FLOAT, default=None,
              help="Spacing of the sampling grid (A) [default: half the window diameter].")
@click.option("--fsc-threshold", type=FSC_VALUE, default=0.143, show_default=True,
              help="Local resolution where the windowed FSC first drops below this value.")
@click.option("--randomize-at-angstrom", type=NONNEGATIVE_FLOAT, default=25.0, show_default=True,
              help="Randomise phases beyond this resolution (A) to correct the windowed FSC; 0: no correction.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the phase randomisation.")
@angpix_option
@overwrite_option
@handle_errors
def locres(half1: str, half2: str, mask_path: str | None, out_dir: str, window_angstrom: float,
           window_edge_angstrom: float | None, sampling_angstrom: float | None, fsc_threshold: float,
           randomize_at_angstrom: float, seed: int, angpix: float | None, overwrite: bool) -> None:
    from numba_recon.evaluate.locres import check_locres_outputs, local_resolution, write_locres

    # the values themselves were checked by the option types
    if mask_path is None:
        raise InputError("--mask is required: local resolution is only defined inside the particle", None,
                         "make one with e.g. `numba-recon mask MAP -o mask.mrc --threshold auto --extend 3 "
                         "--soft-edge 6` and pass --mask mask.mrc")
    # Inputs first (cheap), so a bad map or header leaves no empty output folder behind.
    map1, map2, pixel = read_map_pair(half1, half2, angpix)
    mask = read_mask(mask_path, map1.shape)
    check_locres_outputs(out_dir, overwrite)
    result = local_resolution(map1, map2, pixel, mask, window_angstrom=window_angstrom,
                              edge_angstrom=window_edge_angstrom, sampling_angstrom=sampling_angstrom,
                              fsc_threshold=fsc_threshold, randomize_at_angstrom=randomize_at_angstrom or None,
                              seed=seed)
    # The full equivalent command, defaults resolved, so the summary alone reproduces the run.
    args = ["numba-recon", "locres", half1, half2, "--mask", mask_path, "-o", out_dir,
            "--window-angstrom", f"{result.window_diameter_angstrom:g}",
            "--window-edge-angstrom", f"{result.window_edge_angstrom:g}",
            "--sampling-angstrom", f"{result.sampling_angstrom:g}", "--fsc-threshold", f"{fsc_threshold:g}",
            "--randomize-at-angstrom", f"{randomize_at_angstrom:g}", "--seed", str(seed),
            "--angpix", f"{pixel:g}"]
    if overwrite:
        args.append("--overwrite")
    files = write_locres(result, out_dir, half1, half2, mask_path, command=shlex.join(args), overwrite=overwrite)

    stats = result.statistics()
    click.echo(f"local resolution inside the mask: median {stats['median_angstrom']:.2f} A, 5-95 % "
               f"{stats['percentile_5_angstrom']:.2f}-{stats['percentile_95_angstrom']:.2f} A, range "
               f"{stats['min_angstrom']:.2f}-{stats['max_angstrom']:.2f} A (FSC = {fsc_threshold:g})")
    click.echo(f"{len(result.points)} windows of {result.window_diameter_angstrom:g} A (edge "
               f"{result.window_edge_angstrom:g} A) every {result.sampling_px} voxels, sub-box {result.subbox_size} "
               f"(shells of {1.0 / result.shell_width_inv_angstrom:.1f} A / i)")
    for path in files.values():
        click.echo(f"wrote {path}")
