"""Simulate a particle data set with known truth.

Projects the built-in phantom (a proteasome-like D7 assembly of Gaussian blobs, projected
analytically) or a map given with --volume (padded Fourier slicing) at uniformly random poses,
applies RELION's CTF and a random sub-pixel shift, adds white noise at the requested SNR and
writes RELION files: particles.star (RELION 3.1, half sets in rlnRandomSubset),
Particles/stack_NNNN.mrcs, truth.mrc (the map in the units of the images), junk.csv (which
particles are junk, and the true poses) and simulation.json (every parameter, the noise level,
the measured SNR, the list of files written). SNR = mean variance of the clean CTF-modulated
images over the whole box, divided by the noise variance; the images are scaled so that the
noise has standard deviation 1.
With --overwrite only the files an earlier simulate wrote there (and that are unchanged) are
removed; other files stay, and a warning names them.

Example:

\b
    numba-recon simulate -o sim --n-particles 5000 --box-size 96 --angpix 2.0 --snr 0.05 \\
        --junk-fraction 0.2 --junk-kind noise --junk-kind wrong_pose
"""

from __future__ import annotations

import click

from numba_recon.cli._common import (FiniteNumber, NONNEGATIVE_FLOAT, PIXEL_SIZE, POSITIVE_FLOAT, POSITIVE_INT, SEED,
                                     handle_errors, overwrite_option)

#: [0, 1): a share that cannot be the whole set.
_PROPER_FRACTION = FiniteNumber(0, 1, max_open=True)


@click.command("simulate", help=__doc__)
@click.option("-o", "--output", "--out", "out_dir", required=True, type=click.Path(),
              help="Output folder (must be empty or new unless --overwrite).")
@click.option("--n-particles", type=POSITIVE_INT, default=5000, show_default=True, help="Number of particle images.")
@click.option("--box-size", type=POSITIVE_INT, default=None,
              help="Image size in pixels.  [default: 64, or the size of --volume]")
@click.option("--angpix", type=PIXEL_SIZE, default=None,
              help="Pixel size in Angstrom.  [default: 2.0, or the voxel size of --volume]")
@click.option("--snr", type=POSITIVE_FLOAT, default=0.1, show_default=True,
              help="Signal-to-noise ratio (variance of the clean image over the whole box / noise variance).")
@click.option("--defocus-min", type=POSITIVE_FLOAT, default=1.0, show_default=True,
              help="Smallest defocus U, micrometres.")
@click.option("--defocus-max", type=POSITIVE_FLOAT, default=2.5, show_default=True,
              help="Largest defocus U, micrometres.")
@click.option("--astigmatism", type=NONNEGATIVE_FLOAT, default=200.0, show_default=True,
              help="DefocusU - DefocusV in Angstrom.")
@click.option("--voltage", type=POSITIVE_FLOAT, default=300.0, show_default=True, help="Acceleration voltage, kV.")
@click.option("--cs", type=NONNEGATIVE_FLOAT, default=2.7, show_default=True, help="Spherical aberration, mm.")
@click.option("--amplitude-contrast", type=_PROPER_FRACTION, default=0.1, show_default=True,
              help="Amplitude contrast Q0.")
@click.option("--max-shift", type=NONNEGATIVE_FLOAT, default=3.0, show_default=True,
              help="Origins are drawn uniformly in a disc of this radius, pixels.")
@click.option("--junk-fraction", type=_PROPER_FRACTION, default=0.0, show_default=True,
              help="Fraction of junk particles, in [0, 1).")
@click.option("--junk-kind", "junk_kinds", multiple=True,
              type=click.Choice(["noise", "wrong_pose", "other_object"]),
              help="Kind of junk (repeatable; the kinds share the junk evenly).  [default: all three]")
@click.option("--volume", "volume_path", type=click.Path(dir_okay=False), default=None,
              help="Project this MRC map instead of the built-in phantom.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--particles-per-stack", type=POSITIVE_INT, default=1000, show_default=True,
              help="Images per .mrcs stack.")
@overwrite_option
@handle_errors
def simulate(out_dir: str, n_particles: int, box_size: int | None, angpix: float | None, snr: float,
             defocus_min: float, defocus_max: float, astigmatism: float, voltage: float, cs: float,
             amplitude_contrast: float, max_shift: float, junk_fraction: float, junk_kinds: tuple[str, ...],
             volume_path: str | None, seed: int, particles_per_stack: int, overwrite: bool) -> None:
    from numba_recon.sim.simulate import simulate_dataset

    s = simulate_dataset(
        out_dir, n_particles=n_particles, box_size=box_size, pixel_size_angstrom=angpix, snr=snr,
        defocus_min_um=defocus_min, defocus_max_um=defocus_max, astigmatism_angstrom=astigmatism,
        voltage_kv=voltage, cs_mm=cs, amplitude_contrast=amplitude_contrast, max_shift_px=max_shift,
        junk_fraction=junk_fraction, junk_kinds=junk_kinds or None, volume_path=volume_path, seed=seed,
        particles_per_stack=particles_per_stack, overwrite=overwrite,
    )
    junk = ", ".join(f"{v} {k}" for k, v in s["junk"].items() if v) or "none"
    click.echo(f"Simulated {s['n_particles']} particles of the {s['phantom'].replace('_', ' ')} "
               f"(box {s['box_size']}, {s['pixel_size_angstrom']:g} A/px) in {s['elapsed_s']:.1f} s")
    click.echo(f"  SNR:       requested {s['requested_snr']:g}, measured {s['measured_snr']:.4g} "
               f"(noise sigma {s['noise_sigma']:.4g} before normalising to 1)")
    click.echo(f"  particles: {s['star']} ({s['n_stacks']} stack(s))")
    click.echo(f"  truth:     {s['truth']}")
    click.echo(f"  junk:      {junk} (truth in {s['junk_table']})")
