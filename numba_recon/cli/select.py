"""Keep the best-scoring particles of a run and write a cleaned STAR file for RELION.

Scores are the per-particle scores of ``run_data.star`` (column ``rlnNumbaReconScore``; lower is
better, see docs/robustness.md). Select by fraction (ranked within each half set, so both halves keep
the same share) or by a score threshold.

\b
Examples:
  numba-recon select recon/run_data.star --keep-fraction 0.7 -o clean.star
  numba-recon select recon/run_data.star --max-score -0.02 -o clean.star
  numba-recon select recon/run_data.star --kept -o clean.star      # the robust loss's own choice
"""

from __future__ import annotations

import math

import click
import numpy as np

from numba_recon.cli._common import check_output_file, handle_errors
from numba_recon.errors import InputError, InputFileError

SCORE = "rlnNumbaReconScore"


@click.command("select", help=__doc__)
@click.argument("run_data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Cleaned STAR file.")
@click.option("--keep-fraction", type=float, default=None, help="Keep this fraction (0, 1] of each half set.")
@click.option("--max-score", type=float, default=None, help="Keep particles with a score at most this value.")
@click.option("--kept", "use_kept", is_flag=True, help="Keep the particles the robust loss kept (rlnNumbaReconKept).")
@click.option("--angpix", type=float, default=None, help="Pixel size, if the STAR file lacks it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@handle_errors
def select(run_data: str, output: str, keep_fraction: float | None, max_score: float | None, use_kept: bool,
           angpix: float | None, overwrite: bool) -> None:
    from numba_recon.io.star import read_star, write_star

    chosen = sum(x is not None and x is not False for x in (keep_fraction, max_score, use_kept or None))
    if chosen != 1:
        raise InputError("give exactly one of --keep-fraction, --max-score or --kept", None,
                         "e.g. --keep-fraction 0.7")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:  # also refuses NaN
        raise InputError(f"--keep-fraction {keep_fraction} is outside (0, 1]", None, "e.g. --keep-fraction 0.7")
    if max_score is not None and not math.isfinite(max_score):
        raise InputError(f"--max-score {max_score} is not a finite number", None,
                         "give a score from the rlnNumbaReconScore column, e.g. --max-score -0.02")
    if angpix is not None and not (math.isfinite(angpix) and angpix > 0):
        raise InputError(f"--angpix {angpix} must be a finite positive number of Angstrom", None,
                         "e.g. --angpix 1.06")
    out = check_output_file(output, overwrite)
    particles = read_star(run_data, angpix=angpix)
    table = particles.table
    column = "rlnNumbaReconKept" if use_kept else SCORE
    if column not in table.columns:
        raise InputFileError(f"no {column} column", run_data,
                             "give the run_data.star written by `numba-recon run`")
    if use_kept:
        keep = table[column].to_numpy().astype(int) == 1
    else:
        scores = table[SCORE].to_numpy(dtype=np.float64)
        if max_score is not None:
            keep = scores <= max_score
        else:
            keep = np.zeros(len(table), dtype=bool)
            halves = particles.half_set if np.any(particles.half_set) else np.ones(len(table), np.int8)
            for h in np.unique(halves):
                idx = np.flatnonzero(halves == h)
                k = int(np.ceil(keep_fraction * idx.size - 1e-9))
                order = idx[np.argsort(np.nan_to_num(scores[idx], nan=np.inf), kind="stable")]
                keep[order[:k]] = True
    if not keep.any():
        raise InputError("the selection keeps no particles", run_data, "loosen the threshold")
    write_star(particles.subset(keep), out)
    click.echo(f"kept {int(keep.sum())} of {keep.size} particles -> {out}")
