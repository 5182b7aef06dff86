"""Simulate a small D7 data set, reconstruct it and write the report: the whole job in one command.

\b
Example:
  numba-recon demo -o demo_out
  numba-recon demo -o demo_out --backend cuda --particles 4000

The data set is made by the built-in simulator (a proteasome-like D7 phantom of Gaussian blobs,
analytic projections, RELION CTF, noise at SNR 0.1), so the result can be scored against the truth:
the command prints the half-map resolution and the resolution of the map against the ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from numba_recon.backend import CHOICES as BACKENDS
from numba_recon.cli._common import PIXEL_SIZE, POSITIVE_INT, SEED, handle_errors, prepare_output_dir
from numba_recon.io.run_files import HALF1_MAP, HALF2_MAP, MAP, SUCCESS_MARKER


@click.command("demo", help=__doc__)
@click.option("-o", "--output", "out_dir", default="numba_recon_demo", show_default=True,
              type=click.Path(file_okay=True), help="Output folder (data in data/, reconstruction in recon/).")
@click.option("--particles", "n_particles", type=POSITIVE_INT, default=5000, show_default=True,
              help="Number of particles.")
@click.option("--box-size", type=POSITIVE_INT, default=64, show_default=True, help="Box size in pixels.")
@click.option("--angpix", type=PIXEL_SIZE, default=2.0, show_default=True, help="Pixel size in Angstrom.")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="Most passes (default: the solver's, 8).")
@click.option("--sym", "symmetry", default="C1", show_default=True, help="Point group used by the reconstruction.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo folder.")
@click.pass_context
@handle_errors
def demo(ctx: click.Context, out_dir: str, n_particles: int, box_size: int, angpix: float, epochs: int | None,
         symmetry: str, backend: str, seed: int, overwrite: bool) -> None:
    from numba_recon.config import RunConfig
    from numba_recon.recon.engine import run as run_engine
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import read_volume
    from numba_recon.sim.simulate import simulate_dataset

    out = prepare_output_dir(out_dir, overwrite)
    data_dir = out / "data"
    recon_dir = out / "recon"
    click.echo(f"Simulating {n_particles} particles (box {box_size}, {angpix} A/px, SNR 0.1) into {data_dir} ...")
    simulate_dataset(data_dir, n_particles=n_particles, box_size=box_size, pixel_size_angstrom=angpix, snr=0.1,
                     defocus_min_um=1.0, defocus_max_um=2.5, astigmatism_angstrom=200.0, voltage_kv=300.0, cs_mm=2.7,
                     amplitude_contrast=0.1, max_shift_px=3.0, junk_fraction=0.0, junk_kinds=("noise",),
                     volume_path=None, seed=seed, particles_per_stack=1000, overwrite=True)
    recon_dir.mkdir(parents=True, exist_ok=True)
    config = RunConfig(particles=str(data_dir / "particles.star"), out_dir=str(recon_dir), epochs=epochs,
                       backend=backend, seed=seed, symmetry=symmetry)
    click.echo(f"Reconstructing into {recon_dir} ...")
    verbosity = (ctx.find_root().obj or {}).get("verbosity", 0)
    summary = run_engine(config, progress=verbosity >= 0)
    truth, _ = read_volume(data_dir / "truth.mrc")
    # the unfiltered average of the half maps (run_class001.mrc is also low-pass filtered)
    half1, _ = read_volume(recon_dir / HALF1_MAP)
    half2, _ = read_volume(recon_dir / HALF2_MAP)
    curve = fsc(0.5 * (half1 + half2), truth)
    res_truth = resolution_at(curve, box_size, angpix, 0.5)
    summary["resolution_vs_truth_fsc05_angstrom"] = res_truth
    (recon_dir / "demo.json").write_text(json.dumps({"resolution_angstrom": summary["resolution_angstrom"],
                                                     "resolution_vs_truth_fsc05_angstrom": res_truth}, indent=2))
    (recon_dir / SUCCESS_MARKER).touch()
    click.echo(f"Half-map resolution (FSC 0.143): {summary['resolution_angstrom']:.2f} A")
    click.echo(f"Map vs ground truth (FSC 0.5):   {res_truth:.2f} A")
    click.echo(f"Maps:   {Path(recon_dir) / MAP} (and the half maps beside it)")
    click.echo(f"Report: {Path(recon_dir) / 'report.html'}")
