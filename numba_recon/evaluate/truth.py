"""The map against the truth (simulated data): finding the true map, its FSC with the run's map,
and the ``fsc_truth.csv`` table."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon.io.run_files import FSC_TRUTH_CSV as TRUTH_FSC_CSV
from numba_recon.io.run_files import HALF1_MAP, HALF2_MAP

log = logging.getLogger(__name__)

ANG = "\u00c5"
#: File name the simulator gives the true map, next to its ``particles.star``.
TRUTH_NAME = "truth.mrc"
#: FSC threshold of a map against a noise-free reference (Rosenthal & Henderson 2003: 0.5, the
#: equivalent of 0.143 between two half maps).
TRUTH_THRESHOLD = 0.5


def find_truth(particles: str | os.PathLike | None, box: int, angpix: float,
               explicit: str | os.PathLike | None = None) -> Path | None:
    """The true map of a simulated data set, when there is one that fits the reconstruction.

    ``explicit`` (``--truth``) must exist and have the map's box and voxel size, else
    :class:`~numba_recon.errors.InputFileError`. Otherwise ``truth.mrc`` next to the particles
    file (where ``numba-recon simulate`` and ``demo`` write it) is used when it exists and fits; a
    file that does not fit is passed over with a log message (it belongs to another data set).
    """
    from numba_recon.errors import InputFileError
    from numba_recon.io.mrc import mrc_header

    def fits(p: Path) -> str | None:
        try:
            h = mrc_header(str(p))
        except InputFileError as err:
            return f"is unreadable ({err.problem})"
        if not (h.nx == h.ny == h.nz == int(box)):
            return f"box {h.nx} x {h.ny} x {h.nz} differs from the map's {box}"
        voxel = float(h.voxel_size_angstrom[0])
        if voxel > 0 and abs(voxel - float(angpix)) > 1e-3 * float(angpix):
            return f"voxel size {voxel:.4f} {ANG} differs from the map's {float(angpix):.4f} {ANG}"
        return None

    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise InputFileError("truth map not found", p, "check the --truth path")
        why = fits(p)
        if why:
            raise InputFileError(f"truth map {why}", p, "give the true map at the reconstruction's box and voxel size")
        return p
    if not particles:
        return None
    p = Path(particles).parent / TRUTH_NAME
    if not p.is_file():
        return None
    why = fits(p)
    if why:
        log.info("not comparing with %s: %s", p, why)
        return None
    return p


def truth_fsc(half1: np.ndarray, half2: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """FSC of the average of the unfiltered half maps against the true map.

    The unfiltered average, not ``run_class001.mrc``: the filtered map is low-passed at the
    half-map resolution, which would cut the curve there and hide what the data hold beyond.
    This is the figure ``numba-recon demo`` prints.
    """
    from numba_recon.evaluate.fsc import fsc

    avg = 0.5 * (np.asarray(half1, dtype=np.float64) + np.asarray(half2, dtype=np.float64))
    return fsc(avg, np.asarray(truth, dtype=np.float64))


def write_fsc_table(path: str | os.PathLike, curve: np.ndarray, box: int, angpix: float) -> Path:
    """An FSC curve in the one FSC table format (:func:`numba_recon.evaluate.fsc.write_fsc_csv`)."""
    from numba_recon.evaluate.fsc import write_fsc_csv

    return write_fsc_csv(path, {"fsc": np.asarray(curve)}, box, angpix, overwrite=True)


def read_fsc_table(path: str | os.PathLike) -> np.ndarray:
    """The ``fsc`` column of an FSC table written by :func:`write_fsc_table` (or ``fsc.csv``)."""
    import csv

    with open(path, newline="") as fh:  # the "#" lines first: version and command
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        return np.array([float(row["fsc"]) for row in rows], dtype=np.float64)


def compare_with_truth(out_dir: str | os.PathLike, truth_path: str | os.PathLike, box: int, angpix: float,
                       half1: np.ndarray | None = None, half2: np.ndarray | None = None,
                       ) -> tuple[dict[str, Any], np.ndarray]:
    """FSC of the run's map against the true map: writes ``fsc_truth.csv``.

    ``half1``, ``half2`` default to the run folder's unfiltered half maps. Returns the entry
    ``summary.json`` keeps under ``"truth"`` and the curve.
    """
    from numba_recon.evaluate.fsc import resolution_at
    from numba_recon.io.mrc import read_volume

    out = Path(out_dir)
    if half1 is None or half2 is None:
        half1, _ = read_volume(out / HALF1_MAP)
        half2, _ = read_volume(out / HALF2_MAP)
    truth, _ = read_volume(truth_path)
    curve = truth_fsc(half1, half2, truth)
    write_fsc_table(out / TRUTH_FSC_CSV, curve, box, angpix)
    entry = {
        "map": str(truth_path),
        "compared": "average of the unfiltered half maps",
        "threshold": TRUTH_THRESHOLD,
        "resolution_angstrom": float(resolution_at(curve, box, angpix, TRUTH_THRESHOLD)),
        "fsc": TRUTH_FSC_CSV,
    }
    return entry, curve


def truth_for_folder(out_dir: str | os.PathLike, summary: dict[str, Any], explicit: str | os.PathLike | None = None,
                     ) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The comparison with the truth for ``numba-recon report``: computed afresh when the true map is
    found (``explicit``, or ``truth.mrc`` beside the run's particles file), else the run's own
    ``fsc_truth.csv`` and summary entry, else ``(None, None)``.
    """
    out = Path(out_dir)
    box = int(summary["box_size"])
    angpix = float(summary["pixel_size_angstrom"])
    particles = summary.get("config", {}).get("particles")
    path = find_truth(particles, box, angpix, explicit)
    halves = [out / HALF1_MAP, out / HALF2_MAP]
    if path is not None and all(h.is_file() for h in halves):
        return compare_with_truth(out, path, box, angpix)
    entry = summary.get("truth")
    table = out / TRUTH_FSC_CSV
    if entry and table.is_file():
        curve = read_fsc_table(table)
        if curve.size == box // 2 + 1:
            return entry, curve
    return None, None
