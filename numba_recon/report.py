"""The report stage: maps, tables, plots and the HTML page of a run folder.

Output names follow RELION so existing scripts and GUIs find them:

- ``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``: the half maps;
- ``run_class001.mrc``: their average, FSC-weighted and low-pass filtered at the resolution;
- ``run_model.star``: RELION's ``data_model_general``, ``data_model_classes`` and ``data_model_class_1``
  (gold-standard FSC, SSNR, learned prior; :mod:`numba_recon.io.relion_model`);
- ``run_data.star``: every input column, RELION labels only, image names as in the input;
- ``run_data_scores.csv``: the per-particle scores, weights and flags (see ``docs/robustness.md``);
- ``history.csv``, ``fsc.csv``, ``summary.json``, ``command.txt``;
- ``fsc_truth.csv``: with a known true map (simulated data), the FSC of the map against it;
- ``plots/``: ``fsc.png``, ``loss.png``, ``slices.png``, ``projections.png``, ``directions.png``,
  ``scores.png`` (drawn by :mod:`numba_recon.plots`);
- ``run.cxc``: a ChimeraX script showing the map at a suggested contour level (:mod:`numba_recon.chimerax`);
- ``postprocess/`` (with ``--mask``): the outputs of ``numba-recon postprocess`` on the half maps;
- ``report.html``: one self-contained page with all of it (images embedded, no external links).

With a point group other than C1 the half maps arrive here already projected onto the symmetric
maps (``engine.Reconstruction._symmetrize_final``); the filtered average and the sharpened map are
projected again after filtering, so every written map is symmetric (``docs/symmetry.md``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from numba_recon import __version__
from numba_recon.checkpoint import atomic_write_text
from numba_recon.errors import InputError, InputFileError

if TYPE_CHECKING:  # pragma: no cover
    from numba_recon.engine import Reconstruction, RunState

log = logging.getLogger(__name__)

PLOTS = "plots"
POSTPROCESS_DIR = "postprocess"
# the plots of a run folder, in the order the report shows them
PLOT_FILES = ("fsc.png", "loss.png", "slices.png", "projections.png", "directions.png", "scores.png")


def filtered_average(half1: np.ndarray, half2: np.ndarray, fsc_curve: np.ndarray, resolution_angstrom: float,
                     pixel_size_angstrom: float) -> np.ndarray:
    """Average of the half maps, weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` and low-pass
    filtered at the resolution (RELION's FSC weighting, raised-cosine edge)."""
    from numba_recon.evaluate.filters import fsc_weight, lowpass

    avg = 0.5 * (half1.astype(np.float64) + half2.astype(np.float64))
    weighted = fsc_weight(avg, np.asarray(fsc_curve))
    return lowpass(weighted, resolution_angstrom, pixel_size_angstrom).astype(np.float32)


def write_model_star(path: Path, fsc_curve: np.ndarray, box: int, angpix: float, resolution: float, *,
                     reference_image: str = "run_class001.mrc", spectra: dict[str, np.ndarray] | None = None) -> None:
    """``run_model.star`` in RELION's shape (:func:`numba_recon.io.relion_model.write_model_star`):
    ``data_model_general``, ``data_model_classes`` and ``data_model_class_1``; ``spectra`` adds the
    learned prior and the Fourier completeness (:func:`numba_recon.io.relion_model.solver_spectra`)."""
    from numba_recon.io.relion_model import write_model_star as write_relion_model

    spectra = spectra or {}
    write_relion_model(path, fsc_curve, box, angpix, resolution, reference_image=reference_image,
                       tau2=spectra.get("tau2"), fourier_completeness=spectra.get("fourier_completeness"))


# The figures themselves live in numba_recon.plots (one font and legend style for all of them);
# these names stay for code that draws a single figure of a run.

def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Training and cross-validation loss, and the half-map resolution, against the epoch."""
    from numba_recon import plots as figures

    figures.plot_loss(history, path)


def plot_slices(volume: np.ndarray, path: Path, angpix: float, title: str = "Slices of the map") -> None:
    """XY, XZ and YZ slices of a ``(N, N, N)`` map through the box centre and the centre of mass,
    axes in Angstrom from the box centre (:func:`numba_recon.plots.plot_map_slices`)."""
    from numba_recon import plots as figures

    figures.plot_map_slices(volume, angpix, path, title=title)


def plot_projections(volume: np.ndarray, path: Path, angpix: float) -> None:
    """Front (sum along Z) and side (sum along Y, along X) projections of the map."""
    from numba_recon import plots as figures

    figures.plot_map_projections(volume, angpix, path)


def plot_scores(scores: np.ndarray, kept: np.ndarray | None, path: Path, loss: str) -> None:
    """Histogram of per-particle scores; kept and down-weighted particles stacked when ``kept`` is given."""
    from numba_recon import plots as figures

    figures.plot_scores(scores, kept, path, loss)


def final_weights(job: "Reconstruction", scores: np.ndarray, st: "RunState") -> tuple[np.ndarray, np.ndarray]:
    """Per-particle weight and kept flag under the final robust settings, ranked within each half."""
    from numba_recon.loss import final_particle_weights

    return final_particle_weights(scores, st.halves, job.schedule)


def validate_mask(path: str | os.PathLike, box_size: int, pixel_size_angstrom: float) -> np.ndarray:
    """Read the post-processing mask of a run and check that it fits the reconstruction.

    Call it before the first epoch, so a wrong mask stops the run at once instead of at the end.

    Parameters
    ----------
    path
        MRC mask (values in [0, 1], 1 = particle), e.g. from ``numba-recon mask``.
    box_size, pixel_size_angstrom
        The particles' box and pixel size.

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` float32 mask.

    Raises
    ------
    InputFileError
        Missing or unreadable file, another box or voxel size, values outside [0, 1], or an empty
        mask; the message names the file and the fix.
    """
    from numba_recon.evaluate.fsc import check_mask
    from numba_recon.io.mrc import read_volume

    p = Path(path)
    if not p.is_file():
        raise InputFileError("mask file not found", p, "check the --mask path")
    mask, voxel = read_volume(p)
    n = int(box_size)
    if mask.shape != (n, n, n):
        raise InputFileError(f"mask box {mask.shape[0]} differs from the particle box {n}", p,
                             "make the mask from a map of this reconstruction's box (numba-recon mask), or resample it")
    angpix = float(pixel_size_angstrom)
    if voxel > 0 and abs(voxel - angpix) > 1e-3 * angpix:
        raise InputFileError(f"mask voxel size {voxel:.4f} A differs from the particle pixel size {angpix:.4f} A", p,
                             "make the mask at the particles' pixel size")
    try:
        mask = check_mask(mask, mask.shape)
    except InputError as err:
        raise InputFileError(err.problem, p, err.fix) from None
    if not float(mask.max()) > 0:
        raise InputFileError("mask is empty (all zero)", p, "lower the threshold when making the mask")
    return mask


def _project_if_symmetric(job: "Reconstruction", volume: np.ndarray) -> np.ndarray:
    """The exact projection onto the run's point group (``adam``) or the group average (``cg``);
    unchanged for C1."""
    if len(job.sym_ops) <= 1:
        return volume
    if job.config.optimizer == "cg":
        from numba_recon.symmetry import symmetrize_volume

        return symmetrize_volume(volume, job.sym_ops)
    from numba_recon.symmetry import symmetric_subspace

    space = symmetric_subspace(job.box, job.config.symmetry, min(job.radius, job.box // 2 - 1))
    return space.project(volume)


def _run_postprocess(job: "Reconstruction", half1: np.ndarray, half2: np.ndarray) -> dict[str, Any]:
    """``numba-recon postprocess`` with the run's mask on the half maps, into ``OUT/postprocess``.

    A failure of the post-processing itself (for example half maps whose FSC never drops below
    0.8) is logged and recorded in the summary; it does not lose the reconstruction.
    """
    from numba_recon.evaluate.postprocess import postprocess, write_postprocess

    out = job.out
    mask_path = job.config.mask
    mask = validate_mask(mask_path, job.box, job.angpix)
    try:
        result = postprocess(half1, half2, job.angpix, mask=mask)
    except InputError as err:
        log.warning("post-processing with %s failed: %s", mask_path, err)
        return {"mask": str(mask_path), "error": str(err)}
    if len(job.sym_ops) > 1:
        result.map = _project_if_symmetric(job, result.map)
        result.map_masked = result.map * mask
    files = write_postprocess(result, out / POSTPROCESS_DIR, out / "run_half1_class001_unfil.mrc",
                              out / "run_half2_class001_unfil.mrc", mask_path, overwrite=True)
    return {
        "mask": str(mask_path),
        "resolution_angstrom": float(result.resolution_angstrom),
        "bfactor": float(result.bfactor_angstrom2),
        "bfactor_fitted": bool(result.bfactor_fitted),
        "mask_used": bool(result.mask_used),
        "unmasked_fallback": bool(result.unmasked_fallback),
        "randomize_from_angstrom": result.randomize_at_angstrom,
        "lowpass_angstrom": float(result.lowpass_angstrom),
        "warnings": list(result.warnings),
        "files": {name: f"{POSTPROCESS_DIR}/{name}" for name in files},
    }


def _command_line() -> str:
    """The command as typed: ``numba-recon ...`` also when started as ``python -m numba_recon``."""
    import shlex

    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("numba-recon", "__main__.py"):
        argv[0] = "numba-recon"
    return shlex.join(argv)


def _solver_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Report rows saying how the default solver ended: the pass whose maps were kept, and why."""
    solver = summary.get("solver") or {}
    if solver.get("optimizer") != "cg":
        return [("Solver", str(summary.get("config", {}).get("optimizer", "adam")))]
    return [
        ("Solver", "direct reconstruction + preconditioned conjugate gradients (prior learned from the FSC)"),
        ("Maps kept", f"pass {solver.get('best_pass')} of {solver.get('passes')} (lowest held-out loss); "
                      f"{solver.get('stop_reason')}"),
        ("Particle diameter", f"{_fmt(solver.get('particle_diameter_angstrom'), '.1f', ' ' + ANG)} "
                              f"({solver.get('particle_diameter_source')})"),
    ]


def _compare_with_truth(job: "Reconstruction", half1: np.ndarray, half2: np.ndarray,
                        ) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """FSC of the run's map against the true map when there is one (``truth.mrc`` beside the
    particles file, as ``numba-recon simulate`` writes it, or the configuration's ``truth``).

    A true map that does not fit is logged and skipped: it must not cost the finished run.
    """
    from numba_recon import plots as figures

    try:
        path = figures.find_truth(job.config.particles, job.box, job.angpix, getattr(job.config, "truth", None))
        if path is None:
            return None, None
        return figures.compare_with_truth(job.out, path, job.box, job.angpix, half1, half2)
    except InputError as err:
        log.warning("no comparison with the true map: %s", err)
        return None, None


def write_run_outputs(job: "Reconstruction", st: "RunState", losses: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Write every output of a finished run (rank 0 only). Returns the summary dictionary."""
    from numba_recon.evaluate.fsc import fsc, resolution_at
    from numba_recon.io.mrc import write_volume
    from numba_recon.io.star import write_star

    out = job.out
    plots = out / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    box, angpix = job.box, job.angpix
    half1, half2 = st.volumes[0], st.volumes[1]
    curve = fsc(half1, half2)
    res = resolution_at(curve, box, angpix, 0.143)
    res05 = resolution_at(curve, box, angpix, 0.5)
    # Fourier filtering is not exactly symmetric on the grid: project the filtered map again
    average = _project_if_symmetric(job, filtered_average(half1, half2, curve, res, angpix))
    write_volume(out / "run_half1_class001_unfil.mrc", half1, angpix, overwrite=True)
    write_volume(out / "run_half2_class001_unfil.mrc", half2, angpix, overwrite=True)
    write_volume(out / "run_class001.mrc", average, angpix, overwrite=True)
    # run_data.star and run_model.star name files relative to the folder the input's image paths are
    # relative to (--root, else the input STAR file's folder), as RELION's files are to the project
    from numba_recon.io.relion_model import solver_spectra
    from numba_recon.io.star import image_name_root, scores_path, without_score_columns, write_particle_scores
    from numba_recon.provenance import comment_lines

    name_root = image_name_root(job.particles, out)
    write_model_star(out / "run_model.star", curve, box, angpix, res,
                     reference_image=os.path.relpath(out / "run_class001.mrc", name_root),
                     spectra=solver_spectra(st.solver, box))
    shells = np.arange(curve.size)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, box * angpix / np.maximum(shells, 1), np.inf)
    atomic_write_text(out / "fsc.csv", "".join(f"{line}\n" for line in comment_lines())
                      + "shell,resolution_inv_angstrom,resolution_angstrom,fsc\n" + "".join(
        f"{i},{i / (box * angpix):.6g},{a:.6g},{f:.6f}\n" for i, a, f in zip(shells, ang, curve)))
    weights, kept = final_weights(job, scores, st)
    # RELION labels only in run_data.star (RELION warns about unknown ones); the run's own
    # per-particle figures go to run_data_scores.csv, keyed by the image names (docs/robustness.md)
    names = write_star(without_score_columns(job.particles), out / "run_data.star",
                       extra_columns={"rlnRandomSubset": st.halves.astype(int)}, keep_input_names=True)
    write_particle_scores(scores_path(out / "run_data.star"), names, {
        "loss": losses, "score": scores, "weight": weights, "kept": kept.astype(int),
        "half_set": st.halves.astype(int), "cross_validation": st.cv.astype(int),
    }, encoding=str(job.particles.meta.get("text_encoding", "utf-8")))
    from numba_recon import plots as figures
    from numba_recon.chimerax import write_chimerax_script

    truth, truth_curve = _compare_with_truth(job, half1, half2)
    # the viewing direction is the third row of each particle's matrix A (numba_recon.plots)
    figures.draw_figures(plots, box=box, angpix=angpix, fsc_curve=curve, resolution=res, truth_curve=truth_curve,
                         truth_resolution=truth["resolution_angstrom"] if truth else None, history=st.history,
                         volume=average, directions=figures.directions_from_vectors(job.particles.rotations[:, 2, :]),
                         symmetry=str(job.config.symmetry), scores=scores,
                         kept=kept if job.schedule.loss != "l2" else None, loss=job.schedule.loss)
    write_chimerax_script(out, average, angpix, resolution_angstrom=res)
    from numba_recon.engine import describe_environment

    summary: dict[str, Any] = {
        "version": __version__,
        "command_line": _command_line(),
        "config": job.config.to_dict(),
        "particles": int(len(job.particles)),
        "half_set_sizes": [int(np.sum(st.halves == 1)), int(np.sum(st.halves == 2))],
        "cross_validation_particles": int(st.cv.sum()),
        "box_size": box,
        "pixel_size_angstrom": angpix,
        "resolution_angstrom": float(res),
        "resolution_fsc05_angstrom": float(res05),
        "epochs": int(st.epoch),
        "steps": int(st.step),
        "ranks": int(job.comm.size),
        "backend": job.backend.name,
        "timings_s": {k: round(v, 3) for k, v in job.timings.items()},
        "seconds_per_epoch": [round(r["seconds"], 3) for r in st.history],
        "environment": describe_environment(job.backend.name),
        "outputs": {
            "half1": "run_half1_class001_unfil.mrc",
            "half2": "run_half2_class001_unfil.mrc",
            "map": "run_class001.mrc",
            "model": "run_model.star",
            "data": "run_data.star",
            "scores": "run_data_scores.csv",
            "report": "report.html",
            "chimerax": "run.cxc",
        },
        # the folder the image names of run_data.star are relative to (numba-recon select reads it)
        "image_name_root": str(name_root),
    }
    if truth:
        summary["truth"] = truth
        summary["outputs"]["fsc_truth"] = truth["fsc"]
    if getattr(job, "solver_summary", None):
        summary["solver"] = job.solver_summary
    if len(job.sym_ops) > 1 and job.config.optimizer == "cg":
        summary["symmetry"] = {"group": str(job.config.symmetry), "operators": int(len(job.sym_ops)),
                               "final_maps": "group average"}
    elif len(job.sym_ops) > 1:
        from numba_recon.symmetry import symmetric_subspace

        space = symmetric_subspace(box, job.config.symmetry, min(job.radius, box // 2 - 1))
        summary["symmetry"] = {
            "group": str(job.config.symmetry), "operators": int(len(job.sym_ops)),
            "basis_functions": space.n_functions,
            "projection_iterations": space.last.iterations,
            "projection_relative_residual": space.last.relative_residual,
        }
    if job.config.mask:
        summary["postprocess"] = _run_postprocess(job, half1, half2)
        summary["outputs"]["postprocess"] = f"{POSTPROCESS_DIR}/postprocess.mrc"
    if not (out / "command.txt").exists():  # the command that started the run; resumes go to note.txt
        atomic_write_text(out / "command.txt", summary["command_line"] + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_html_report(out)
    return summary


# ------------------------------------------------------------------------------------------------
# Plots from the files of a run folder (numba-recon report)
# ------------------------------------------------------------------------------------------------

def _read_csv_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:  # the header comment lines (version, command) start with "#"
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                parsed[key] = float("nan")
        out.append(parsed)
    return out


def make_plots(out_dir: str | os.PathLike, truth: str | os.PathLike | None = None) -> list[Path]:
    """(Re)draw the plots of a finished run folder from its files.

    Uses ``summary.json``, ``fsc.csv``, ``history.csv``, ``run_class001.mrc``, the angles of
    ``run_data.star`` and the scores of ``run_data_scores.csv`` (kept and rejected particles apart
    for a robust loss); a plot whose input is missing is skipped. With a true map (``truth``, or
    ``truth.mrc`` beside the run's particles file) the FSC of the map against it is recomputed into
    ``fsc_truth.csv`` and drawn with the half-map FSC, and ``summary.json`` records it, so the
    page's table shows it.

    Returns
    -------
    list of Path
        The plots written.
    """
    from numba_recon import plots as figures

    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    box = int(summary["box_size"])
    angpix = float(summary["pixel_size_angstrom"])
    res = float(summary.get("resolution_angstrom", float("nan")))
    curve = None
    if (out / "fsc.csv").is_file():
        curve = np.array([r["fsc"] for r in _read_csv_rows(out / "fsc.csv")])
    truth_entry, truth_curve = figures.truth_for_folder(out, summary, truth)
    if truth_entry and truth_entry != summary.get("truth"):
        summary["truth"] = truth_entry
        summary.setdefault("outputs", {})["fsc_truth"] = truth_entry["fsc"]
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    history = _read_csv_rows(out / "history.csv") if (out / "history.csv").is_file() else None
    volume = None
    if (out / "run_class001.mrc").is_file():
        from numba_recon.io.mrc import read_volume

        volume, _ = read_volume(out / "run_class001.mrc")
    loss = str(summary.get("config", {}).get("loss", "l2"))
    directions = scores = kept = None
    if (out / "run_data.star").is_file():
        import starfile

        tables = starfile.read(out / "run_data.star", always_dict=True)
        table = tables.get("particles", next(iter(tables.values())))
        if "rlnAngleRot" in table and "rlnAngleTilt" in table:
            directions = figures.directions_from_angles(table["rlnAngleRot"].to_numpy(dtype=np.float64),
                                                        table["rlnAngleTilt"].to_numpy(dtype=np.float64))
        from numba_recon.io.star import read_particle_scores

        # run_data_scores.csv beside it, or the score columns of a run_data.star from before that table
        try:
            found = read_particle_scores(out / "run_data.star", table) if "rlnImageName" in table else None
        except InputFileError as err:  # a score table that does not fit: draw the rest
            log.warning("no score plot: %s", err)
            found = None
        if found is not None and "score" in found:
            scores = found["score"].to_numpy(dtype=np.float64)
            if loss != "l2" and "kept" in found:
                kept = found["kept"].to_numpy() > 0
    return figures.draw_figures(
        out / PLOTS, box=box, angpix=angpix, fsc_curve=curve, resolution=res, truth_curve=truth_curve,
        truth_resolution=truth_entry["resolution_angstrom"] if truth_entry else None, history=history,
        volume=volume, directions=directions, symmetry=summary.get("config", {}).get("symmetry"), scores=scores,
        kept=kept, loss=loss)


# ------------------------------------------------------------------------------------------------
# The HTML page
# ------------------------------------------------------------------------------------------------

ANG = "\u00c5"
ANG2 = "\u00c5\u00b2"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1100px;
       padding: 0 1em; color: #1d2329; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 2px solid #dde3ea; padding-bottom: 0.2em; }
.sub { color: #5b6670; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #d5dce3; border-radius: 8px; padding: 0.6em 1em; min-width: 12em; background: #f7f9fb; }
.card .k { color: #5b6670; font-size: 0.85em; } .card .v { font-size: 1.6em; font-weight: 600; }
.card.main { background: #e8f2ff; border-color: #9cc3f5; } .card.main .v { font-size: 2.1em; color: #0b4fa3; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { text-align: left; padding: 0.25em 1em;
        border-bottom: 1px solid #e3e7eb; vertical-align: top; }
th { font-weight: 600; color: #39424a; }
figure { margin: 0.8em 0 1.4em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #5b6670; font-size: 0.9em; }
pre { background: #f3f5f7; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.warn { background: #fff4e0; border-left: 4px solid #e69b00; padding: 0.4em 0.8em; margin: 0.4em 0; }
nav a { margin-right: 1em; color: #0b4fa3; text-decoration: none; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1.2em; align-items: start; }
"""


def _img_tag(path: Path, alt: str, caption: str | None = None) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(caption if caption is not None else alt)
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not np.isfinite(v):
        return "n/a"
    return f"{v:{spec}}{unit}"


def _card(key: str, value: str, main: bool = False) -> str:
    return (f'<div class="card{" main" if main else ""}"><div class="k">{html.escape(key)}</div>'
            f'<div class="v">{html.escape(value)}</div></div>')


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def _pair(*parts: str) -> str:
    parts = tuple(p for p in parts if p)
    if len(parts) < 2:
        return "".join(parts)
    return f'<div class="pair">{"".join(f"<div>{p}</div>" for p in parts)}</div>'


def _bfactor_text(pp: dict[str, Any]) -> str:
    if not pp.get("bfactor_fitted") and not pp.get("bfactor"):
        return "none (no fit possible)"
    return _fmt(pp.get("bfactor"), ".1f", " " + ANG2) + (" (fitted)" if pp.get("bfactor_fitted") else " (given)")


def _section(anchor: str, title: str, body: str) -> tuple[str, str, str]:
    return anchor, title, f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>\n'


def write_html_report(out_dir: str | os.PathLike) -> Path:
    """Write ``report.html``: one self-contained page (images embedded as base64 PNG, no scripts,
    no external links) summarising a finished run folder.

    Sections: the resolution at a glance, FSC curves (half maps; the map against the truth when
    it is known; masked and corrected ones with post-processing), training history, slices through
    the box centre and the centre of mass, projections, viewing directions, per-particle scores,
    symmetry, the command line and the versions. Plots come from ``plots/`` and ``postprocess/``
    (see :func:`make_plots` to redraw them).
    """
    out = Path(out_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    plots = out / PLOTS
    cfg = summary.get("config", {})
    pp = summary.get("postprocess") or {}
    sym = summary.get("symmetry") or {}
    truth = summary.get("truth") or {}
    name = out.resolve().name

    cards = [_card("Resolution (half maps, FSC 0.143)", _fmt(summary.get("resolution_angstrom"), ".2f", " " + ANG),
                   main=not pp.get("resolution_angstrom"))]
    if pp.get("resolution_angstrom"):
        cards.insert(0, _card("Resolution (masked, corrected)", _fmt(pp["resolution_angstrom"], ".2f", " " + ANG),
                              main=True))
        cards.append(_card("B-factor for sharpening", _bfactor_text(pp)))
    if truth:
        cards.append(_card("Map vs truth (FSC 0.5)", _fmt(truth.get("resolution_angstrom"), ".2f", " " + ANG)))
    cards += [_card("Particles", str(summary.get("particles", "n/a"))),
              _card("Symmetry", str(cfg.get("symmetry", "C1"))),
              _card("Box / pixel", f"{summary.get('box_size', '?')} px, "
                                   f"{_fmt(summary.get('pixel_size_angstrom'), '.3g', ' ' + ANG)}")]
    details = [
        ("Resolution at FSC 0.5", _fmt(summary.get("resolution_fsc05_angstrom"), ".2f", " " + ANG)),
        *([("Resolution vs truth (FSC 0.5)", f"{_fmt(truth.get('resolution_angstrom'), '.2f', ' ' + ANG)} "
                                             f"({truth.get('compared', 'map')} against {truth.get('map')})")]
          if truth else []),
        ("Half sets", f"{summary.get('half_set_sizes')} particles, {summary.get('cross_validation_particles')} "
                      "held out for cross-validation"),
        ("Loss", str(cfg.get("loss", "n/a"))),
        *_solver_rows(summary),
        ("Epochs / optimiser steps", f"{summary.get('epochs')} / {summary.get('steps')}"),
        ("Backend / MPI ranks", f"{summary.get('backend')} / {summary.get('ranks')}"),
        ("Particles file", str(cfg.get("particles", "n/a"))),
        ("Time for the epochs", _fmt(summary.get("timings_s", {}).get("epochs_s"), ".1f", " s")),
    ]
    if (out / "run.cxc").is_file():
        from numba_recon.chimerax import describe_script

        details.append(("3D view (ChimeraX)", describe_script(out / "run.cxc")))
    body = [f'<div class="cards">{"".join(cards)}</div>', _table(details)]

    warnings = list(pp.get("warnings", []))
    if pp.get("error"):
        warnings.insert(0, f"post-processing failed: {pp['error']}")
    if warnings:
        body.append("".join(f'<div class="warn">{html.escape(w)}</div>' for w in warnings))

    sections = []
    fsc_half = _img_tag(plots / "fsc.png", "FSC between the half maps",
                        "Gold-standard FSC between the two independently reconstructed half maps; the vertical "
                        "line marks the resolution (last shell before the FSC first drops below 0.143)."
                        + (" Red: FSC of the average of the unfiltered half maps against the true map, marked "
                           "where it first drops below 0.5." if truth else ""))
    fsc_pp = ""
    if pp and not pp.get("error"):
        pp_res = _fmt(pp.get("resolution_angstrom"), ".2f", " " + ANG)
        fsc_pp = _img_tag(out / POSTPROCESS_DIR / "postprocess_fsc.png", "Post-processing FSC curves",
                          f"With the mask {pp.get('mask')}: unmasked, masked, phase-randomised masked and corrected "
                          f"FSC (Chen et al. 2013); resolution {pp_res}.")
    sections.append(_section("fsc", "Resolution: Fourier shell correlation",
                             _pair(fsc_half, fsc_pp) or "<p>No FSC plot found.</p>"))
    if pp and not pp.get("error"):
        pp_rows = [("Mask", str(pp.get("mask"))),
                   ("Resolution (FSC 0.143)", _fmt(pp.get("resolution_angstrom"), ".2f", " " + ANG)),
                   ("B-factor", _bfactor_text(pp)),
                   ("Phases randomised from", _fmt(pp.get("randomize_from_angstrom"), ".2f", " " + ANG)),
                   ("Low-pass", _fmt(pp.get("lowpass_angstrom"), ".2f", " " + ANG)),
                   ("Sharpened maps", f"{POSTPROCESS_DIR}/postprocess.mrc, {POSTPROCESS_DIR}/postprocess_masked.mrc")]
        guinier = _img_tag(out / POSTPROCESS_DIR / "postprocess_guinier.png", "Guinier plot",
                           "ln of the mean Fourier amplitude against resolution squared: average of the half maps, "
                           "FSC-weighted, sharpened, and the fitted line whose slope gives the B-factor.")
        sections.append(_section("postprocess", "Post-processing", _pair(_table(pp_rows), guinier)))
    sections.append(_section("history", "Training history", _img_tag(
        plots / "loss.png", "Loss and resolution history",
        "Left: loss per pixel of the training particles and of the held-out cross-validation particles. "
        "Right: half-map resolution after each epoch.") or "<p>No history recorded.</p>"))
    sections.append(_section("slices", "Map: slices", _img_tag(
        plots / "slices.png", "Slices of the filtered map",
        "XY, XZ and YZ slices of run_class001.mrc (FSC-weighted average, low-pass filtered at the resolution). "
        "Top: through the box centre (red cross: the centre of mass projected onto the plane). Bottom: through "
        "the centre of mass of the density above the suggested contour level or, where that is the box centre, "
        "through the plane with the most density, which cuts the wall of a hollow particle. Each panel names "
        "its plane and position.") or "<p>No map found.</p>"))
    sections.append(_section("projections", "Map: front and side projections", _img_tag(
        plots / "projections.png", "Projections of the filtered map",
        "Sums of run_class001.mrc along Z (front), Y and X (sides).") or "<p>No map found.</p>"))
    sections.append(_section("directions", "Viewing directions", _img_tag(
        plots / "directions.png", "Distribution of the viewing directions",
        "Direction of view of every particle (rlnAngleRot, rlnAngleTilt) on a Mollweide map of the sphere, "
        "counted in equal-area bins: a hot spot is a preferred orientation, a dark region a missing view, "
        "which lowers the resolution along that direction.") or "<p>No particle angles found.</p>"))
    robust = cfg.get("loss", "l2") != "l2"
    if robust or (plots / "scores.png").is_file():
        sections.append(_section("scores", "Per-particle scores", _img_tag(
            plots / "scores.png", "Per-particle scores",
            "Score of every particle against the final half map of its half set: (loss \u2212 ||image||\u00b2) / "
            "||model image||\u00b2, \u22121 for a perfect fit, about +1 for an image without the particle. "
            + ("The robust loss keeps the low-score population and down-weights the rest. " if robust else
               "The L2 loss weighs every particle the same; a second population at high scores is junk worth "
               "removing (numba-recon select, or a robust --loss). ")
            + "Scores and weights are in run_data_scores.csv.")
            or "<p>No score plot found.</p>"))
    if sym:
        sym_rows = [("Point group", f"{sym.get('group')} ({sym.get('operators')} operators, RELION's convention)"),
                    ("During the run", "gradient averaged over the group each step, each half map on its own"),
                    ("Final maps", f"exact projection onto symmetric maps ({sym.get('basis_functions')} basis "
                                   f"functions, {sym.get('projection_iterations')} CG iterations, relative residual "
                                   f"{_fmt(sym.get('projection_relative_residual'), '.1e')})")]
        if sym.get("final_maps") == "group average":
            sym_rows[1:] = [("During the run", "sampling density, data and every pass's residual averaged over the "
                                               "group, each half map on its own"),
                            ("Final maps", "group average of each half map (docs/symmetry.md)")]
        sections.append(_section("symmetry", "Symmetry", _table(sym_rows)))
    sections.append(_section("command", "Command line",
                             f"<pre>{html.escape(str(summary.get('command_line', 'n/a')))}</pre>"))
    env = summary.get("environment", {})
    versions = [("numba-recon", str(summary.get("version", env.get("version", "n/a"))))]
    versions += [(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in sorted(env.items())
                 if k != "version" and k != "argv"]
    sections.append(_section("versions", "Versions and environment", _table(versions)))

    short = {"fsc": "FSC", "postprocess": "Post-processing", "history": "History", "slices": "Slices",
             "projections": "Projections", "directions": "Views", "scores": "Scores", "symmetry": "Symmetry",
             "command": "Command", "versions": "Versions"}
    nav = "<nav>" + "".join(f'<a href="#{a}">{short.get(a, html.escape(t))}</a>' for a, t, _ in sections) + "</nav>"
    written = time.strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>numba-recon report: {html.escape(name)}</title>
<style>{_CSS}</style></head><body>
<h1>numba-recon report: {html.escape(name)}</h1>
<p class="sub">{html.escape(str(out.resolve()))} &middot; report written {html.escape(written)}</p>
{nav}
<section id="summary">{''.join(body)}</section>
{''.join(text for _, _, text in sections)}
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
