"""Keep the best-scoring particles of a run and write a cleaned STAR file for RELION.

Scores are the per-particle scores of a run: run_data_scores.csv beside run_data.star (or the
rlnNumbaReconScore column of a run_data.star from an older version); lower is better, see
docs/robustness.md. Select by fraction (ranked within each half set, so both halves keep the same
share) or by a score threshold.

Image names are written as run_data.star has them, relative to the same root (the RELION project
folder when the run was given --root): open the output in RELION from that folder. The root is the
one the run recorded in summary.json; --root overrides it.

\b
Examples:
  numba-recon select recon/run_data.star --keep-fraction 0.7 -o clean.star
  numba-recon select recon/run_data.star --max-score -0.02 -o clean.star
  numba-recon select recon/run_data.star --kept -o clean.star      # the robust loss's own choice
  numba-recon select NumbaRecon/job001/run_data.star --root . --kept -o Select/job012/particles.star
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from numba_recon.cli._common import FINITE_FLOAT, FRACTION, PIXEL_SIZE, check_output_file, handle_errors
from numba_recon.errors import InputError, InputFileError
from numba_recon.io.run_files import SUMMARY_JSON

SCORE = "rlnNumbaReconScore"


def run_image_root(run_data: str | os.PathLike) -> str | None:
    """The folder the image names of a run's ``run_data.star`` are relative to, as the run recorded
    it (``summary.json`` beside it, key ``image_name_root``); None when there is no such record (a
    file from an older version, or not from a run: its names are relative to its own folder)."""
    summary = Path(run_data).with_name(SUMMARY_JSON)
    try:
        root = json.loads(summary.read_text()).get("image_name_root")
    except (OSError, ValueError, AttributeError):
        return None
    return root if isinstance(root, str) and os.path.isdir(root) else None


@click.command("select", help=__doc__)
@click.argument("run_data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Cleaned STAR file.")
@click.option("--keep-fraction", type=FRACTION, default=None, help="Keep this fraction (0, 1] of each half set.")
@click.option("--max-score", type=FINITE_FLOAT, default=None, help="Keep particles with a score at most this value.")
@click.option("--kept", "use_kept", is_flag=True,
              help="Keep the particles the robust loss kept (column kept of run_data_scores.csv).")
@click.option("--angpix", type=PIXEL_SIZE, default=None, help="Pixel size, if the STAR file lacks it.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder the image paths are relative to (default: the run's own, from summary.json, "
                   "else the STAR file's folder).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@handle_errors
def select(run_data: str, output: str, keep_fraction: float | None, max_score: float | None, use_kept: bool,
           angpix: float | None, root: str | None, overwrite: bool) -> None:
    from numba_recon.io.star import read_particle_scores, read_star, scores_path, without_score_columns, write_star

    chosen = sum(x is not None and x is not False for x in (keep_fraction, max_score, use_kept or None))
    if chosen != 1:
        raise InputError("give exactly one of --keep-fraction, --max-score or --kept", None,
                         "e.g. --keep-fraction 0.7")
    out = check_output_file(output, overwrite)
    particles = read_star(run_data, angpix=angpix, root=root if root is not None else run_image_root(run_data))
    table = particles.table
    found = read_particle_scores(run_data, table, encoding=str(particles.meta.get("text_encoding", "utf-8")))
    column = "kept" if use_kept else "score"
    if found is None or column not in found.columns:
        legacy = "rlnNumbaReconKept" if use_kept else SCORE
        what = (f"no {scores_path(run_data).name} beside it, no {legacy} column" if found is None
                else f"no {legacy} column")
        raise InputFileError(f"no per-particle {column} values ({what})", run_data,
                             "give the run_data.star written by `numba-recon run`")
    if use_kept:
        keep = found["kept"].to_numpy().astype(int) == 1
    else:
        scores = found["score"].to_numpy(dtype=np.float64)
        if max_score is not None:
            keep = scores <= max_score
        else:
            keep = np.zeros(len(table), dtype=bool)
            halves = particles.half_set if np.any(particles.half_set) else np.ones(len(table), np.int8)
            if not np.any(particles.half_set) and "half_set" in found.columns:  # the run's own split
                halves = found["half_set"].to_numpy()
            for h in np.unique(halves):
                idx = np.flatnonzero(halves == h)
                k = int(np.ceil(keep_fraction * idx.size - 1e-9))
                order = idx[np.argsort(np.nan_to_num(scores[idx], nan=np.inf), kind="stable")]
                keep[order[:k]] = True
    if not keep.any():
        raise InputError("the selection keeps no particles", run_data, "loosen the threshold")
    # the input's image names, unchanged (RELION's labels only: older score columns are dropped)
    write_star(without_score_columns(particles).subset(keep), out, keep_input_names=True)
    click.echo(f"kept {int(keep.sum())} of {keep.size} particles -> {out}")
