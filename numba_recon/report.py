"""The report stage: maps, tables, plots and the HTML page of a run folder.

Output names follow RELION so existing scripts and GUIs find them:

- ``run_half1_class001_unfil.mrc``, ``run_half2_class001_unfil.mrc``: the half maps;
- ``run_class001.mrc``: their average, FSC-weighted and low-pass filtered at the resolution;
- ``run_model.star``: ``data_model_general`` and ``data_model_class_1`` with the gold-standard FSC;
- ``run_data.star``: every input column plus per-particle scores (see ``docs/robustness.md``);
- ``history.csv``, ``fsc.csv``, ``summary.json``, ``command.txt``;
- ``plots/``: ``fsc.png``, ``loss.png``, ``slices.png``, ``projections.png``, ``scores.png``;
- ``report.html``: one self-contained page with all of it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from numba_recon import __version__
from numba_recon.checkpoint import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from numba_recon.engine import Reconstruction, RunState

log = logging.getLogger(__name__)

PLOTS = "plots"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


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
    tmp = path.with_name(path.name + ".tmp")
    starfile.write({"model_general": general, "model_class_1": table}, tmp, overwrite=True)
    os.replace(tmp, path)


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="training")
    ax1.plot(epochs, [r["cv_loss"] for r in history], "s--", label="cross-validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss per pixel (noise variance units)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [r["resolution_angstrom"] for r in history], "o-", color="C2", label="FSC 0.143")
    ax2.plot(epochs, [r["resolution_05_angstrom"] for r in history], "s--", color="C3", label="FSC 0.5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("half-map resolution (Å)")
    ax2.invert_yaxis()
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle("Training history")
    _savefig(fig, path)
    plt.close(fig)


def plot_slices(volume: np.ndarray, path: Path, angpix: float, title: str = "Central slices") -> None:
    plt = _pyplot()
    c = volume.shape[0] // 2
    views = [("XY (z = centre)", volume[c]), ("XZ (y = centre)", volume[:, c, :]), ("YZ (x = centre)", volume[:, :, c])]
    lo, hi = np.percentile(volume, [1, 99.9])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
    extent = [0, volume.shape[0] * angpix, 0, volume.shape[0] * angpix]
    for ax, (name, img) in zip(axes, views):
        im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent)
        ax.set_title(name)
        ax.set_xlabel("Å")
        ax.set_ylabel("Å")
    fig.colorbar(im, ax=axes, shrink=0.8, label="density")
    fig.suptitle(title)
    _savefig(fig, path)
    plt.close(fig)


def plot_projections(volume: np.ndarray, path: Path, angpix: float) -> None:
    """Front (along z), side (along y) and end (along x) projections of the map."""
    plt = _pyplot()
    views = [("front (sum along z)", volume.sum(axis=0)), ("side (sum along y)", volume.sum(axis=1)),
             ("side (sum along x)", volume.sum(axis=2))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
    extent = [0, volume.shape[0] * angpix, 0, volume.shape[0] * angpix]
    for ax, (name, img) in zip(axes, views):
        ax.imshow(img, cmap="gray", origin="lower", extent=extent)
        ax.set_title(name)
        ax.set_xlabel("Å")
        ax.set_ylabel("Å")
    fig.suptitle("Projections of the map")
    _savefig(fig, path)
    plt.close(fig)


def plot_scores(scores: np.ndarray, weights: np.ndarray | None, path: Path, loss: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    s = scores[np.isfinite(scores)]
    ax.hist(s, bins=60, color="C0", alpha=0.8)
    ax.set_xlabel("particle score (loss change vs blank model, noise-energy units; lower is better)")
    ax.set_ylabel("particles")
    ax.set_title(f"Per-particle scores ({loss} loss)")
    ax.grid(alpha=0.3)
    _savefig(fig, path)
    plt.close(fig)


def final_weights(job: "Reconstruction", scores: np.ndarray, st: "RunState") -> tuple[np.ndarray, np.ndarray]:
    """Per-particle weight and kept flag under the final robust settings, ranked within each half."""
    from numba_recon.loss import final_particle_weights

    return final_particle_weights(scores, st.halves, job.schedule)


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
    average = filtered_average(half1, half2, curve, res, angpix)
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
             title="Gold-standard FSC between half maps")
    if st.history:
        plot_loss(st.history, plots / "loss.png")
    plot_slices(average, plots / "slices.png", angpix)
    plot_projections(average, plots / "projections.png", angpix)
    if job.schedule.loss != "l2":
        plot_scores(scores, weights, plots / "scores.png", job.schedule.loss)
    from numba_recon.engine import describe_environment

    summary = {
        "version": __version__,
        "command_line": " ".join(os.sys.argv),
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
    atomic_write_text(out / "command.txt", summary["command_line"] + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    write_html_report(out)
    return summary


def _img_tag(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_html_report(out_dir: Path) -> Path:
    """One self-contained HTML page (images embedded) summarising a run folder."""
    out = Path(out_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    plots = out / PLOTS
    rows = []
    if summary:
        cfg = summary.get("config", {})
        items = [
            ("Resolution (FSC = 0.143)", f"{summary.get('resolution_angstrom', float('nan')):.2f} Å"),
            ("Resolution (FSC = 0.5)", f"{summary.get('resolution_fsc05_angstrom', float('nan')):.2f} Å"),
            ("Particles", f"{summary.get('particles')} (halves {summary.get('half_set_sizes')}, "
                          f"{summary.get('cross_validation_particles')} held out)"),
            ("Box / pixel size", f"{summary.get('box_size')} px, {summary.get('pixel_size_angstrom')} Å/px"),
            ("Loss", str(cfg.get("loss"))),
            ("Symmetry", str(cfg.get("symmetry"))),
            ("Epochs / steps", f"{summary.get('epochs')} / {summary.get('steps')}"),
            ("Backend / ranks", f"{summary.get('backend')} / {summary.get('ranks')}"),
            ("numba-recon", str(summary.get("version"))),
        ]
        pp = summary.get("postprocess")
        if pp:
            items.insert(1, ("Masked, corrected resolution", f"{pp.get('resolution_angstrom', float('nan')):.2f} Å"))
            items.insert(2, ("B-factor used for sharpening", f"{pp.get('bfactor', float('nan')):.1f} Å²"))
        rows = [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items]
    figures = [
        _img_tag(plots / "fsc.png", "FSC between the half maps (resolution marked at 0.143)"),
        _img_tag(out / "postprocess" / "postprocess_fsc.png", "Post-processing FSC curves (masked, corrected)"),
        _img_tag(plots / "loss.png", "Loss and resolution history"),
        _img_tag(plots / "slices.png", "Central slices of the filtered map"),
        _img_tag(plots / "projections.png", "Front and side projections of the filtered map"),
        _img_tag(plots / "scores.png", "Per-particle scores"),
        _img_tag(out / "postprocess" / "postprocess_guinier.png", "Guinier plot"),
    ]
    versions = summary.get("environment", {})
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>numba-recon report: {html.escape(out.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.6em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: 0.25em 1em; border-bottom: 1px solid #ddd; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
code, pre {{ background: #f5f5f5; padding: 0.2em 0.4em; }}
</style></head><body>
<h1>numba-recon report: {html.escape(str(out.resolve().name))}</h1>
<p>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))}.</p>
<table>{''.join(rows)}</table>
{''.join(f for f in figures if f)}
<h2>Command line</h2><pre>{html.escape(str(summary.get('command_line', '')))}</pre>
<h2>Versions</h2><pre>{html.escape(json.dumps(versions, indent=1, default=str))}</pre>
</body></html>
"""
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
