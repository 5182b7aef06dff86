"""``numba-recon convert``: convert particle metadata between RELION .star and THUNDER .thu."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from numba_recon.cli._common import SEED, angpix_option, handle_errors, overwrite_option
from numba_recon.errors import InputError, OutputError

log = logging.getLogger(__name__)

_WRITERS = {".star": "RELION 3.1 STAR", ".thu": "THUNDER .thu"}


@click.command(name="convert")
@click.argument("input_file", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_file", metavar="OUT", type=click.Path(path_type=Path))
@angpix_option
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Folder the image paths of IN are relative to (default: IN's folder).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the random half split of a .thu input (written as rlnRandomSubset).")
@overwrite_option
@handle_errors
def convert(input_file: Path, output_file: Path, angpix: float | None, root: Path | None, seed: int,
            overwrite: bool) -> None:
    """Convert particle metadata between .star and .thu (the type follows the extensions).

    .thu -> .star writes RELION 3.1 (data_optics + data_particles) with rlnRandomSubset from a
    seeded random split; .star -> .thu writes THUNDER's 27 columns; .star -> .star rewrites a
    RELION 3.0 (or 4, 5) file as RELION 3.1. Poses, origins, CTF parameters and image names are
    preserved; image paths are rewritten relative to OUT's folder. Every particle is validated
    first (stacks exist, indices in range), and nothing is written if anything is wrong.

    Examples:

      numba-recon convert particles.thu particles.star --angpix 1.06

      numba-recon convert run_data.star run_data.thu --root /data/project

      numba-recon convert relion30_particles.star relion31_particles.star
    """
    out_suffix = output_file.suffix.lower()
    if out_suffix not in _WRITERS:
        raise InputError(f"{output_file}: unknown output type {output_file.suffix or '(no extension)'!r}; "
                         "give an output file ending in .star or .thu")
    if output_file.is_dir():
        raise OutputError("output path is a folder", output_file, "give a file name")
    if output_file.exists() and not overwrite:
        raise OutputError("output file exists", output_file, "pass --overwrite to replace it")

    from numba_recon.read import read_particles

    particles = read_particles(input_file, angpix=angpix, root=root, seed=seed)
    if out_suffix == ".star":
        from numba_recon.io.star import write_star

        write_star(particles, output_file)
    else:
        from numba_recon.io.thu import write_thu

        write_thu(particles, output_file)
    log.info("wrote %d particles to %s (%s)", len(particles), output_file, _WRITERS[out_suffix])
