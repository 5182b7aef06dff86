"""Post-process two half maps as relion_postprocess does: masked FSC corrected by phase
randomisation, resolution at FSC = 0.143, FSC weighting, B-factor sharpening and low-pass.

With --mask, phases of both half maps are randomised from the first shell where the unmasked FSC
drops below 0.8, and the corrected FSC is (FSC_masked - FSC_random) / (1 - FSC_random) from two
shells beyond that. Without a mask only the unmasked FSC is used. The B-factor is fitted to the
Guinier plot of the FSC-weighted average between --autob-lowres (10 A) and the resolution, unless
--bfactor is given (negative sharpens). The map is low-pass filtered at the resolution unless
--lowpass is given. Outputs in DIR: postprocess.mrc, postprocess_masked.mrc (with a mask),
postprocess.star (RELION labels), postprocess_fsc.csv, postprocess_fsc.png, postprocess_guinier.png.

\b
Examples:
  numba-recon postprocess run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc --mask mask.mrc -o post
  numba-recon postprocess half1.mrc half2.mrc --mask mask.mrc --bfactor -80 --lowpass 4 -o post --angpix 1.06
"""

from __future__ import annotations

import click

from numba_recon.cli._common import (FINITE_FLOAT, FSC_VALUE, NONNEGATIVE_FLOAT, RESOLUTION_ANGSTROM, SEED,
                                     angpix_option, handle_errors, overwrite_option, read_map_pair, read_mask)


@click.command("postprocess", help=__doc__)
@click.argument("half1", type=click.Path(dir_okay=False))
@click.argument("half2", type=click.Path(dir_okay=False))
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="Soft mask (values in [0, 1]) of the particle, e.g. from `numba-recon mask`.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(),
              help="Output folder.")
@click.option("--bfactor", "bfactor", type=FINITE_FLOAT, default=None,
              help="Sharpen with this B-factor (A^2, negative sharpens) instead of fitting one.")
@click.option("--lowpass", "lowpass_angstrom", type=RESOLUTION_ANGSTROM, default=None,
              help="Low-pass filter at this resolution (A) instead of the FSC = 0.143 resolution.")
@angpix_option
@click.option("--autob-lowres", type=RESOLUTION_ANGSTROM, default=10.0, show_default=True,
              help="Lowest resolution (A) in the B-factor fit.")
@click.option("--autob-highres", type=NONNEGATIVE_FLOAT, default=None,
              help="Highest resolution (A) in the B-factor fit [default: the FSC = 0.143 resolution; 0: Nyquist].")
@click.option("--randomize-at-fsc", type=FSC_VALUE, default=0.8, show_default=True,
              help="Randomise phases from where the unmasked FSC drops below this value.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the phase randomisation.")
@click.option("--force-mask", is_flag=True,
              help="Keep the masked FSC even if the unmasked FSC reaches a higher resolution.")
@click.option("--skip-fsc-weighting", is_flag=True, help="Do not weight shells by sqrt(2 FSC / (1 + FSC)).")
@overwrite_option
@handle_errors
def postprocess(half1: str, half2: str, mask_path: str | None, out_dir: str, bfactor: float | None,
                lowpass_angstrom: float | None, angpix: float | None, autob_lowres: float,
                autob_highres: float | None, randomize_at_fsc: float, seed: int, force_mask: bool,
                skip_fsc_weighting: bool, overwrite: bool) -> None:
    from numba_recon.evaluate.postprocess import check_bfactor, check_postprocess_outputs
    from numba_recon.evaluate.postprocess import postprocess as run_postprocess
    from numba_recon.evaluate.postprocess import write_postprocess

    # Inputs first (cheap), so a bad map or header leaves no empty output folder behind.
    map1, map2, pixel = read_map_pair(half1, half2, angpix)
    mask = read_mask(mask_path, map1.shape) if mask_path else None
    if bfactor is not None:
        check_bfactor(bfactor, pixel)
    check_postprocess_outputs(out_dir, mask_path is not None, overwrite)
    result = run_postprocess(map1, map2, pixel, mask=mask, bfactor=bfactor, lowpass_angstrom=lowpass_angstrom,
                             randomize_at_fsc=randomize_at_fsc, seed=seed, autob_lowres=autob_lowres,
                             autob_highres=-1.0 if autob_highres is None else autob_highres,
                             force_mask=force_mask, fsc_weighting=not skip_fsc_weighting)
    files = write_postprocess(result, out_dir, half1, half2, mask_path, overwrite=overwrite)

    n = result.box_size
    if result.fsc_masked is None:
        which = "unmasked FSC"
    elif result.unmasked_fallback:
        which = "unmasked FSC (it reaches further than the corrected masked FSC)"
    else:
        which = f"corrected masked FSC, phases randomised beyond {result.randomize_at_angstrom:.2f} A"
    click.echo(f"resolution: {result.resolution_angstrom:.2f} A at FSC = 0.143 (shell {result.resolution_shell} "
               f"of {n // 2}; {which})")
    if result.bfactor_fitted:
        high = ("Nyquist" if result.autob_highres_angstrom is None
                else f"{result.autob_highres_angstrom:.2f} A")
        click.echo(f"B-factor: {result.bfactor_angstrom2:.1f} A^2 fitted from {result.autob_lowres_angstrom:g} A to "
                   f"{high} (r^2 {result.guinier_correlation:.3f})")
    else:
        click.echo(f"B-factor: {result.bfactor_angstrom2:.1f} A^2 (given)" if bfactor is not None
                   else "B-factor: none (no fit possible, see the warning)")
    click.echo(f"low-pass: {result.lowpass_angstrom:.2f} A")
    for name, path in files.items():
        click.echo(f"wrote {path}")
