"""Project a map at the poses of a STAR (or .thu) file: clean model images to compare with the data.

Each image is the forward model of the reconstruction, ``T_i C_i P_i x``: the map projected with the
particle's RELION angles, multiplied by its CTF (unless --no-ctf) and moved by ``-origin`` so it
lines up with the experimental image.

\b
Example:
  numba-recon project recon/run_class001.mrc --star particles.star -o model.mrcs
  numba-recon project map.mrc --star particles.star -o model.mrcs --no-ctf --first 100
"""

from __future__ import annotations

import click
import numpy as np

from numba_recon.backend import CHOICES as BACKENDS
from numba_recon.cli._common import PIXEL_SIZE, POSITIVE_INT, check_output_file, handle_errors
from numba_recon.errors import InputFileError


@click.command("project", help=__doc__)
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("--star", "star_path", required=True, type=click.Path(dir_okay=False), help="Particles with poses.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .mrcs stack.")
@click.option("--angpix", type=PIXEL_SIZE, default=None, help="Pixel size (default: from the particle file).")
@click.option("--no-ctf", is_flag=True, help="Do not apply the CTF.")
@click.option("--no-shift", is_flag=True, help="Do not apply the origin shifts.")
@click.option("--first", type=POSITIVE_INT, default=None, help="Only the first N particles.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: CUDA when a GPU is usable, else the CPU (as run).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@handle_errors
def project(map_path: str, star_path: str, output: str, angpix: float | None, no_ctf: bool, no_shift: bool,
            first: int | None, backend: str, overwrite: bool) -> None:
    from numba_recon.backend import get_backend
    from numba_recon.batch import shift_phase
    from numba_recon.ctf import ctf_images
    from numba_recon.forward import default_radius_px, model_images
    from numba_recon.io.mrc import read_volume, write_stack
    from numba_recon.read import read_particles

    out = check_output_file(output, overwrite)
    volume, voxel = read_volume(map_path)
    particles = read_particles(star_path, angpix=angpix)
    if volume.shape[0] != particles.box_size:
        raise InputFileError(f"map box {volume.shape[0]} differs from the particle box {particles.box_size}",
                             map_path, "resample the map to the particles' box size")
    if voxel > 0 and abs(voxel - particles.pixel_size_angstrom) > 0.01 * particles.pixel_size_angstrom:
        raise InputFileError(f"map voxel size {voxel:.4f} A differs from the particle pixel size "
                             f"{particles.pixel_size_angstrom:.4f} A", map_path, "pass --angpix or resample the map")
    n = len(particles) if first is None else min(first, len(particles))
    box = particles.box_size
    be = get_backend(backend)
    radius = default_radius_px(box)
    vol_dev = be.to_device(np.ascontiguousarray(volume, np.float32))
    images = np.empty((n, box, box), np.float32)
    for start in range(0, n, 256):
        idx = np.arange(start, min(n, start + 256))
        rot = np.ascontiguousarray(particles.rotations[idx], np.float32)
        if no_ctf:
            filters = np.ones((idx.size, box, box), np.float32)
        else:
            filters = ctf_images({k: v[idx] for k, v in particles.ctf.items()}, box, particles.pixel_size_angstrom,
                                 half=False)
        proj = be.to_host(model_images(be, vol_dev, be.to_device(rot), be.to_device(filters), radius))
        if not no_shift:
            # the model of the raw image is shifted by -origin
            spec = np.fft.rfft2(proj) * shift_phase(box, -particles.shifts_px[idx])
            proj = np.fft.irfft2(spec, s=(box, box))
        images[idx] = proj
    write_stack(out, images, particles.pixel_size_angstrom, overwrite=overwrite)
    click.echo(f"wrote {n} projections to {out}")
