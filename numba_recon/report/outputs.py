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
  ``scores.png`` (drawn by :mod:`numba_recon.report.plots`);
- ``run.cxc``: a ChimeraX script showing the map at a suggested contour level (:mod:`numba_recon.report.chimerax`);
- ``postprocess/`` (with ``--mask``): the outputs of ``numba-recon postprocess`` on the half maps;
- ``report.html``: one self-contained page with all of it (images embedded, no external links).

With a point group other than C1 the half maps arrive here already projected onto the symmetric
maps (``engine.Reconstruction._symmetrize_final``); the filtered average and the sharpened map are
projected again after filtering, so every written map is symmetric (``docs/symmetry.md``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon import __version__
from numba_recon.io.atomic import atomic_write_text
from numba_recon.errors import InputError
from numba_recon.io.run_files import (CHIMERAX_CXC, COMMAND_TXT, DATA_STAR, FSC_CSV, HALF1_MAP, HALF2_MAP, MAP,
                                      MODEL_STAR, PLOTS_DIR, POSTPROCESS_DIR, REPORT_HTML, SCORES_CSV, SUMMARY_JSON)

# ``job`` below is the engine's finished ``Reconstruction`` and ``st`` its ``RunState``: read by
# attribute only, so the report stage does not import the engine that calls it.
Reconstruction = Any
RunState = Any

log = logging.getLogger(__name__)



def filtered_average(half1: np.ndarray, half2: np.ndarray, fsc_curve: np.ndarray, resolution_angstrom: float,
                     pixel_size_angstrom: float) -> np.ndarray:
    """Average of the half maps, weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` and low-pass
    filtered at the resolution (RELION's FSC weighting, raised-cosine edge)."""
    from numba_recon.evaluate.filters import fsc_weight, lowpass

    avg = 0.5 * (half1.astype(np.float64) + half2.astype(np.float64))
    weighted = fsc_weight(avg, np.asarray(fsc_curve))
    return lowpass(weighted, resolution_angstrom, pixel_size_angstrom).astype(np.float32)


def write_model_star(path: Path, fsc_curve: np.ndarray, box: int, angpix: float, resolution: float, *,
                     reference_image: str = MAP, spectra: dict[str, np.ndarray] | None = None) -> None:
    """``run_model.star`` in RELION's shape (:func:`numba_recon.io.relion_model.write_model_star`):
    ``data_model_general``, ``data_model_classes`` and ``data_model_class_1``; ``spectra`` adds the
    learned prior and the Fourier completeness (:func:`solver_spectra`)."""
    from numba_recon.io.relion_model import write_model_star as write_relion_model

    spectra = spectra or {}
    write_relion_model(path, fsc_curve, box, angpix, resolution, reference_image=reference_image,
                       tau2=spectra.get("tau2"), fourier_completeness=spectra.get("fourier_completeness"))


def solver_spectra(solver: dict[str, Any] | None, box_size: int) -> dict[str, np.ndarray] | None:
    """The learned prior and the Fourier completeness of the default (``cg``) solver, per shell.

    Parameters
    ----------
    solver
        ``RunState.solver`` at the end of a run: ``inv_tau2`` ``(2, N // 2 + 1)`` (``1 / tau_h^2``
        of each half set, 0 where no prior acts) and ``kernels`` (each half's CTF^2-weighted
        sampling density), or None (``--optimizer adam``: no learned prior).
    box_size
        ``N``.

    Returns
    -------
    dict or None
        ``tau2``: ``(N // 2 + 1,)`` the mean of the two halves' ``tau_h^2`` (``inf`` where no
        prior acts, e.g. the DC shell); ``fourier_completeness``: ``(N // 2 + 1,)`` the mean of the
        halves' fraction of coefficients whose sampling density exceeds ``1 / tau_h^2``
        (:func:`numba_recon.objective.fourier_completeness`). None without a learned prior.
    """
    if not solver or solver.get("inv_tau2") is None or solver.get("kernels") is None:
        return None
    from numba_recon.objective import fourier_completeness

    inv = np.asarray(solver["inv_tau2"], np.float64)
    with np.errstate(divide="ignore"):
        tau2 = np.where(inv > 0, 1.0 / np.where(inv > 0, inv, 1.0), np.inf)
    completeness = [fourier_completeness(np.asarray(solver["kernels"][h]), inv[h], box_size)
                    for h in range(inv.shape[0])]
    return {"tau2": tau2.mean(axis=0), "fourier_completeness": np.mean(completeness, axis=0)}


def final_weights(job: Reconstruction, scores: np.ndarray, st: RunState) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle weight and kept flag under the final robust settings, ranked within each half."""
    from numba_recon.loss import final_particle_weights

    return final_particle_weights(scores, st.halves, job.schedule)


def _project_if_symmetric(job: Reconstruction, volume: np.ndarray) -> np.ndarray:
    """The exact projection onto the run's point group (``adam``) or the group average (``cg``);
    unchanged for C1."""
    if len(job.sym_ops) <= 1:
        return volume
    if job.config.optimizer == "cg":
        from numba_recon.symmetry.groups import symmetrize_volume

        return symmetrize_volume(volume, job.sym_ops)
    return job.symmetric_space().project(volume)


def _run_postprocess(job: Reconstruction, half1: np.ndarray, half2: np.ndarray) -> dict[str, Any]:
    """``numba-recon postprocess`` with the run's mask on the half maps, into ``OUT/postprocess``.

    A failure of the post-processing itself (for example half maps whose FSC never drops below
    0.8) is logged and recorded in the summary; it does not lose the reconstruction.
    """
    from numba_recon.evaluate.postprocess import postprocess, write_postprocess

    out = job.out
    mask_path = job.config.mask
    from numba_recon.evaluate.mask import validate_mask

    mask = validate_mask(mask_path, job.box, job.angpix)
    try:
        result = postprocess(half1, half2, job.angpix, mask=mask)
    except InputError as err:
        log.warning("post-processing with %s failed: %s", mask_path, err)
        return {"mask": str(mask_path), "error": str(err)}
    if len(job.sym_ops) > 1:
        result.map = _project_if_symmetric(job, result.map)
        result.map_masked = result.map * mask
    files = write_postprocess(result, out / POSTPROCESS_DIR, out / HALF1_MAP,
                              out / HALF2_MAP, mask_path, overwrite=True)
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


def _compare_with_truth(job: Reconstruction, half1: np.ndarray, half2: np.ndarray,
                        ) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """FSC of the run's map against the true map when there is one (``truth.mrc`` beside the
    particles file, as ``numba-recon simulate`` writes it, or the configuration's ``truth``).

    A true map that does not fit is logged and skipped: it must not cost the finished run.
    """
    from numba_recon.evaluate.truth import compare_with_truth, find_truth

    try:
        path = find_truth(job.config.particles, job.box, job.angpix, getattr(job.config, "truth", None))
        if path is None:
            return None, None
        return compare_with_truth(job.out, path, job.box, job.angpix, half1, half2)
    except InputError as err:
        log.warning("no comparison with the true map: %s", err)
        return None, None


def write_run_outputs(job: Reconstruction, st: RunState, losses: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Write every output of a finished run (rank 0 only). Returns the summary dictionary."""
    from numba_recon.evaluate.fsc import fsc, resolution_at, write_fsc_csv
    from numba_recon.io.mrc import write_volume
    from numba_recon.io.star import write_star

    out = job.out
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    box, angpix = job.box, job.angpix
    half1, half2 = st.volumes[0], st.volumes[1]
    curve = fsc(half1, half2)
    res = resolution_at(curve, box, angpix, 0.143)
    res05 = resolution_at(curve, box, angpix, 0.5)
    # Fourier filtering is not exactly symmetric on the grid: project the filtered map again
    average = _project_if_symmetric(job, filtered_average(half1, half2, curve, res, angpix))
    write_volume(out / HALF1_MAP, half1, angpix, overwrite=True)
    write_volume(out / HALF2_MAP, half2, angpix, overwrite=True)
    write_volume(out / MAP, average, angpix, overwrite=True)
    # run_data.star and run_model.star name files relative to the folder the input's image paths are
    # relative to (--root, else the input STAR file's folder), as RELION's files are to the project
    from numba_recon.io.star import image_name_root, scores_path, without_score_columns, write_particle_scores

    name_root = image_name_root(job.particles, out)
    write_model_star(out / MODEL_STAR, curve, box, angpix, res,
                     reference_image=os.path.relpath(out / MAP, name_root),
                     spectra=solver_spectra(st.solver, box))
    write_fsc_csv(out / FSC_CSV, {"fsc": curve}, box, angpix, overwrite=True)  # the one FSC table format
    weights, kept = final_weights(job, scores, st)
    # RELION labels only in run_data.star (RELION warns about unknown ones); the run's own
    # per-particle figures go to run_data_scores.csv, keyed by the image names (docs/robustness.md)
    names = write_star(without_score_columns(job.particles), out / DATA_STAR,
                       extra_columns={"rlnRandomSubset": st.halves.astype(int)}, keep_input_names=True)
    write_particle_scores(scores_path(out / DATA_STAR), names, {
        "loss": losses, "score": scores, "weight": weights, "kept": kept.astype(int),
        "half_set": st.halves.astype(int), "cross_validation": st.cv.astype(int),
    }, encoding=str(job.particles.meta.get("text_encoding", "utf-8")))
    from numba_recon.report import plots as figures
    from numba_recon.report.chimerax import write_chimerax_script

    truth, truth_curve = _compare_with_truth(job, half1, half2)
    # the viewing direction is the third row of each particle's matrix A (numba_recon.report.plots)
    figures.draw_figures(plots, box=box, angpix=angpix, fsc_curve=curve, resolution=res, truth_curve=truth_curve,
                         truth_resolution=truth["resolution_angstrom"] if truth else None, history=st.history,
                         volume=average, directions=figures.directions_from_vectors(job.particles.rotations[:, 2, :]),
                         symmetry=str(job.config.symmetry), scores=scores,
                         kept=kept if job.schedule.loss != "l2" else None, loss=job.schedule.loss)
    write_chimerax_script(out, average, angpix, resolution_angstrom=res)
    from numba_recon.provenance import command_line, environment
    from numba_recon.reduce import describe_mpi

    summary: dict[str, Any] = {
        "version": __version__,
        "command_line": command_line(),
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
        "environment": {**environment(), "mpi": describe_mpi(), "backend": job.backend.name,
                        "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", "0")) or None},
        "outputs": {
            "half1": HALF1_MAP,
            "half2": HALF2_MAP,
            "map": MAP,
            "model": MODEL_STAR,
            "data": DATA_STAR,
            "scores": SCORES_CSV,
            "report": REPORT_HTML,
            "chimerax": CHIMERAX_CXC,
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
        space = job.symmetric_space()
        summary["symmetry"] = {
            "group": str(job.config.symmetry), "operators": int(len(job.sym_ops)),
            "basis_functions": space.n_functions,
            "projection_iterations": space.last.iterations,
            "projection_relative_residual": space.last.relative_residual,
        }
    if job.config.mask:
        summary["postprocess"] = _run_postprocess(job, half1, half2)
        summary["outputs"]["postprocess"] = f"{POSTPROCESS_DIR}/postprocess.mrc"
    if not (out / COMMAND_TXT).exists():  # the command that started the run; resumes go to note.txt
        atomic_write_text(out / COMMAND_TXT, summary["command_line"] + "\n", durable=True)
    atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n",
                      durable=True)
    from numba_recon.report.page import write_html_report

    write_html_report(out)
    return summary


