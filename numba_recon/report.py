"""The report stage: maps, tables, plots and the HTML page of a run folder.

Output names follow RELION so existing scripts and GUIs find them:

- ``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``: the half maps;
- ``run_class001.mrc``: their average, FSC-weighted and low-pass filtered at the resolution;
- ``run_model.star``: ``data_model_general`` and ``data_model_class_1`` with the gold-standard FSC;
- ``run_data.star``: every input column plus per-particle scores (see ``docs/robustness.md``);
- ``history.csv``, ``fsc.csv``, ``summary.json``, ``command.txt``;
- ``plots/``: ``fsc.png``, ``loss.png``, ``slices.png``, ``projections.png``, ``scores.png``;
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
PLOT_FILES = ("fsc.png", "loss.png", "slices.png", "projections.png", "scores.png")


def _figure(width_in: float, height_in: float):
    # an explicit Agg canvas: works without a display and leaves pyplot's backend alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _savefig(fig, path: Path) -> None:
    from numba_recon.checkpoint import write_error

    from numba_recon import manifest

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    manifest.note_temporary(tmp)  # the output manifest lists what a run writes
    token = None
    try:
        fig.savefig(tmp, dpi=110)
        token = manifest.record_write(path, source=tmp)
        os.replace(tmp, path)
    except OSError as err:
        manifest.undo(token)
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    finally:
        manifest.discard_temporary(tmp)


def filtered_average(half1: np.ndarray, half2: np.ndarray, fsc_curve: np.ndarray, resolution_angstrom: float,
                     pixel_size_angstrom: float) -> np.ndarray:
    """Average of the half maps, weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` and low-pass
    filtered at the resolution (RELION's FSC weighting, raised-cosine edge)."""
    from numba_recon.evaluate.filters import fsc_weight, lowpass

    avg = 0.5 * (half1.astype(np.float64) + half2.astype(np.float64))
    weighted = fsc_weight(avg, np.asarray(fsc_curve))
    return lowpass(weighted, resolution_angstrom, pixel_size_angstrom).astype(np.float32)


def write_model_star(path: Path, fsc_curve: np.ndarray, box: int, angpix: float, resolution: float) -> None:
    """``run_model.star`` with RELION's ``data_model_general`` and ``data_model_class_1`` labels."""
    import pandas as pd
    import starfile

    shells = np.arange(fsc_curve.size)
    inv = shells / (box * angpix)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, box * angpix / np.maximum(shells, 1), 999.0)
    general = pd.DataFrame({"rlnCurrentResolution": [resolution], "rlnPixelSize": [angpix],
                            "rlnOriginalImageSize": [box], "rlnNrClasses": [1]})
    fsc_c = np.clip(fsc_curve, -1, 0.999999)
    ssnr = np.maximum(fsc_c, 0) / (1 - np.maximum(fsc_c, 0))
    table = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": inv, "rlnAngstromResolution": ang,
                          "rlnSsnrMap": ssnr, "rlnGoldStandardFsc": fsc_curve})
    from numba_recon import manifest
    from numba_recon.checkpoint import write_error

    tmp = path.with_name(path.name + ".tmp")
    manifest.note_temporary(tmp)  # the output manifest lists what a run writes
    token = None
    try:
        starfile.write({"model_general": general, "model_class_1": table}, tmp, overwrite=True)
        token = manifest.record_write(path, source=tmp)
        os.replace(tmp, path)
    except OSError as err:
        manifest.undo(token)
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    finally:
        manifest.discard_temporary(tmp)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Training and cross-validation loss, and the half-map resolution, against the epoch."""
    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [float(r["train_loss"]) for r in history], "o-", label="training")
    cv = [float(r["cv_loss"]) for r in history]
    if np.isfinite(cv).any():
        ax1.plot(epochs, cv, "s--", label="cross-validation (held out)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss per pixel (noise variance units)")
    ax1.set_title("Loss", fontsize=10)
    ax1.legend(fontsize=8, frameon=False)
    ax1.grid(alpha=0.3)
    res = [float(r["resolution_angstrom"]) for r in history]
    ax2.plot(epochs, res, "o-", color="C2", label="FSC 0.143")
    ax2.plot(epochs, [float(r["resolution_05_angstrom"]) for r in history], "s--", color="C3", label="FSC 0.5")
    ax2.annotate(f"{res[-1]:.2f} \u00c5", xy=(epochs[-1], res[-1]), xytext=(-6, -6), textcoords="offset points",
                 ha="right", va="top", color="C2", fontsize=9)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("half-map resolution (\u00c5, better is lower)")
    ax2.set_title("Resolution", fontsize=10)
    ax2.invert_yaxis()
    ax2.legend(fontsize=8, frameon=False)
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    _savefig(fig, path)


def _views(volume: np.ndarray, kind: str) -> list[tuple[str, np.ndarray]]:
    c = volume.shape[0] // 2
    if kind == "slices":
        return [("XY plane (z = centre)", volume[c]), ("XZ plane (y = centre)", volume[:, c, :]),
                ("YZ plane (x = centre)", volume[:, :, c])]
    return [("front: sum along Z", volume.sum(axis=0)), ("side: sum along Y", volume.sum(axis=1)),
            ("side: sum along X", volume.sum(axis=2))]


def _axis_labels(name: str) -> tuple[str, str]:
    # (horizontal, vertical) axis of each view: arrays are indexed [z, y, x]
    if name.startswith("XY") or "along Z" in name:
        return "X (\u00c5)", "Y (\u00c5)"
    if name.startswith("XZ") or "along Y" in name:
        return "X (\u00c5)", "Z (\u00c5)"
    return "Y (\u00c5)", "Z (\u00c5)"


def _plot_views(volume: np.ndarray, path: Path, angpix: float, kind: str, title: str) -> None:
    fig = _figure(11, 3.9)
    axes = fig.subplots(1, 3)
    n = volume.shape[0]
    half = n * angpix / 2
    extent = [-half, half, -half, half]
    views = _views(np.asarray(volume, dtype=np.float64), kind)
    if kind == "slices":
        lo, hi = np.percentile(volume, [1, 99.9])
    im = None
    for ax, (name, img) in zip(axes, views):
        if kind == "slices":
            im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent)
        else:
            ax.imshow(img, cmap="gray", origin="lower", extent=extent)
        ax.set_title(name, fontsize=10)
        xlabel, ylabel = _axis_labels(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="density (map units)")
    fig.suptitle(title)
    _savefig(fig, path)


def plot_slices(volume: np.ndarray, path: Path, angpix: float, title: str = "Central slices of the map") -> None:
    """Central XY, XZ and YZ slices of a ``(N, N, N)`` map, axes in Angstrom from the box centre."""
    _plot_views(volume, path, angpix, "slices", title)


def plot_projections(volume: np.ndarray, path: Path, angpix: float) -> None:
    """Front (sum along Z) and side (sum along Y, along X) projections of the map."""
    _plot_views(volume, path, angpix, "projections", "Projections of the map")


def plot_scores(scores: np.ndarray, kept: np.ndarray | None, path: Path, loss: str) -> None:
    """Histogram of per-particle scores, kept and down-weighted particles stacked."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    fig = _figure(7, 3.8)
    ax = fig.subplots()
    if ok.any():
        bins = np.histogram_bin_edges(s[ok], bins=60)
        if kept is None:
            ax.hist(s[ok], bins=bins, color="C0", alpha=0.85, label="particles")
        else:
            k = np.asarray(kept, dtype=bool)
            ax.hist([s[ok & k], s[ok & ~k]], bins=bins, stacked=True, color=["C0", "C3"], alpha=0.85,
                    label=[f"kept ({int(np.sum(ok & k))})", f"down-weighted or rejected ({int(np.sum(ok & ~k))})"])
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("score (loss - ||image||\u00b2) / ||model image||\u00b2; -1 = perfect fit, lower is better")
    ax.set_ylabel("particles")
    ax.set_title(f"Per-particle scores against the final half maps ({loss} loss)", fontsize=10)
    ax.grid(alpha=0.3)
    _savefig(fig, path)


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


def write_run_outputs(job: "Reconstruction", st: "RunState", losses: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Write every output of a finished run (rank 0 only). Returns the summary dictionary."""
    from numba_recon.evaluate.fsc import fsc, plot_fsc, resolution_at
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
    write_model_star(out / "run_model.star", curve, box, angpix, res)
    shells = np.arange(curve.size)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, box * angpix / np.maximum(shells, 1), np.inf)
    atomic_write_text(out / "fsc.csv", "shell,resolution_inv_angstrom,resolution_angstrom,fsc\n" + "".join(
        f"{i},{i / (box * angpix):.6g},{a:.6g},{f:.6f}\n" for i, a, f in zip(shells, ang, curve)))
    weights, kept = final_weights(job, scores, st)
    extra = {
        "rlnNumbaReconLoss": losses,
        "rlnNumbaReconScore": scores,
        "rlnNumbaReconWeight": weights,
        "rlnNumbaReconKept": kept.astype(int),
        "rlnNumbaReconHalfSet": st.halves.astype(int),
        "rlnNumbaReconCrossValidation": st.cv.astype(int),
    }
    write_star(job.particles, out / "run_data.star", extra_columns=extra)
    plot_fsc({"half maps": curve}, box, angpix, plots / "fsc.png", resolution=res,
             title=f"Gold-standard FSC between the half maps: {res:.2f} \u00c5 at 0.143")
    if st.history:
        plot_loss(st.history, plots / "loss.png")
    plot_slices(average, plots / "slices.png", angpix)
    plot_projections(average, plots / "projections.png", angpix)
    if job.schedule.loss != "l2":
        plot_scores(scores, kept, plots / "scores.png", job.schedule.loss)
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
            "report": "report.html",
        },
    }
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
    atomic_write_text(out / "command.txt", summary["command_line"] + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_html_report(out)
    return summary


# ------------------------------------------------------------------------------------------------
# Plots from the files of a run folder (numba-recon report)
# ------------------------------------------------------------------------------------------------

def _read_csv_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
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


def make_plots(out_dir: str | os.PathLike) -> list[Path]:
    """(Re)draw the plots of a finished run folder from its files.

    Uses ``summary.json``, ``fsc.csv``, ``history.csv``, ``run_class001.mrc`` and, for a robust
    loss, the score columns of ``run_data.star``; a plot whose input is missing is skipped.

    Returns
    -------
    list of Path
        The plots written.
    """
    from numba_recon.evaluate.fsc import plot_fsc

    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    plots = out / PLOTS
    plots.mkdir(exist_ok=True)
    box = int(summary["box_size"])
    angpix = float(summary["pixel_size_angstrom"])
    res = float(summary.get("resolution_angstrom", float("nan")))
    written = []
    if (out / "fsc.csv").is_file():
        curve = np.array([r["fsc"] for r in _read_csv_rows(out / "fsc.csv")])
        if curve.size == box // 2 + 1:
            plot_fsc({"half maps": curve}, box, angpix, plots / "fsc.png", resolution=res,
                     title=f"Gold-standard FSC between the half maps: {res:.2f} \u00c5 at 0.143")
            written.append(plots / "fsc.png")
    if (out / "history.csv").is_file():
        history = _read_csv_rows(out / "history.csv")
        if history:
            plot_loss(history, plots / "loss.png")
            written.append(plots / "loss.png")
    if (out / "run_class001.mrc").is_file():
        from numba_recon.io.mrc import read_volume

        volume, _ = read_volume(out / "run_class001.mrc")
        plot_slices(volume, plots / "slices.png", angpix)
        plot_projections(volume, plots / "projections.png", angpix)
        written += [plots / "slices.png", plots / "projections.png"]
    loss = str(summary.get("config", {}).get("loss", "l2"))
    if loss != "l2" and (out / "run_data.star").is_file():
        import starfile

        tables = starfile.read(out / "run_data.star", always_dict=True)
        table = tables.get("particles", next(iter(tables.values())))
        if "rlnNumbaReconScore" in table:
            kept = table["rlnNumbaReconKept"].to_numpy() > 0 if "rlnNumbaReconKept" in table else None
            plot_scores(table["rlnNumbaReconScore"].to_numpy(dtype=np.float64), kept, plots / "scores.png", loss)
            written.append(plots / "scores.png")
    return written


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

    Sections: the resolution at a glance, FSC curves (half maps; masked and corrected ones with
    post-processing), training history, central slices, projections, per-particle scores (robust
    losses), symmetry, the command line and the versions. Plots come from ``plots/`` and
    ``postprocess/`` (see :func:`make_plots` to redraw them).
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
    name = out.resolve().name

    cards = [_card("Resolution (half maps, FSC 0.143)", _fmt(summary.get("resolution_angstrom"), ".2f", " " + ANG),
                   main=not pp.get("resolution_angstrom"))]
    if pp.get("resolution_angstrom"):
        cards.insert(0, _card("Resolution (masked, corrected)", _fmt(pp["resolution_angstrom"], ".2f", " " + ANG),
                              main=True))
        cards.append(_card("B-factor for sharpening", _bfactor_text(pp)))
    cards += [_card("Particles", str(summary.get("particles", "n/a"))),
              _card("Symmetry", str(cfg.get("symmetry", "C1"))),
              _card("Box / pixel", f"{summary.get('box_size', '?')} px, "
                                   f"{_fmt(summary.get('pixel_size_angstrom'), '.3g', ' ' + ANG)}")]
    details = [
        ("Resolution at FSC 0.5", _fmt(summary.get("resolution_fsc05_angstrom"), ".2f", " " + ANG)),
        ("Half sets", f"{summary.get('half_set_sizes')} particles, {summary.get('cross_validation_particles')} "
                      "held out for cross-validation"),
        ("Loss", str(cfg.get("loss", "n/a"))),
        *_solver_rows(summary),
        ("Epochs / optimiser steps", f"{summary.get('epochs')} / {summary.get('steps')}"),
        ("Backend / MPI ranks", f"{summary.get('backend')} / {summary.get('ranks')}"),
        ("Particles file", str(cfg.get("particles", "n/a"))),
        ("Time for the epochs", _fmt(summary.get("timings_s", {}).get("epochs_s"), ".1f", " s")),
    ]
    body = [f'<div class="cards">{"".join(cards)}</div>', _table(details)]

    warnings = list(pp.get("warnings", []))
    if pp.get("error"):
        warnings.insert(0, f"post-processing failed: {pp['error']}")
    if warnings:
        body.append("".join(f'<div class="warn">{html.escape(w)}</div>' for w in warnings))

    sections = []
    fsc_half = _img_tag(plots / "fsc.png", "FSC between the half maps",
                        "Gold-standard FSC between the two independently reconstructed half maps; the red line "
                        "marks the resolution (last shell before the FSC first drops below 0.143).")
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
    sections.append(_section("slices", "Map: central slices", _img_tag(
        plots / "slices.png", "Central slices of the filtered map",
        "Central XY, XZ and YZ slices of run_class001.mrc (FSC-weighted average, low-pass filtered at the "
        "resolution).") or "<p>No map found.</p>"))
    sections.append(_section("projections", "Map: front and side projections", _img_tag(
        plots / "projections.png", "Projections of the filtered map",
        "Sums of run_class001.mrc along Z (front), Y and X (sides).") or "<p>No map found.</p>"))
    if cfg.get("loss", "l2") != "l2":
        sections.append(_section("scores", "Per-particle scores", _img_tag(
            plots / "scores.png", "Per-particle scores",
            "Scores of every particle against the final half map of its half set; the robust loss keeps the "
            "low-score population and down-weights the rest. Scores and weights are in run_data.star.")
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
             "projections": "Projections", "scores": "Scores", "symmetry": "Symmetry", "command": "Command",
             "versions": "Versions"}
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
