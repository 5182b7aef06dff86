"""The HTML page of a run folder, ``report.html``: one self-contained file (figures embedded, no
external links) with the resolution, the run's settings and solver, the figures, the
post-processing and the files written."""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from numba_recon.io.atomic import atomic_write_text
from numba_recon.io.run_files import PLOTS_DIR, POSTPROCESS_DIR
from numba_recon.io.run_files import CHIMERAX_CXC, REPORT_HTML, SUMMARY_JSON


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
        summary = json.loads((out / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        summary = {}
    plots = out / PLOTS_DIR
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
    if (out / CHIMERAX_CXC).is_file():
        from numba_recon.report.chimerax import describe_script

        details.append(("3D view (ChimeraX)", describe_script(out / CHIMERAX_CXC)))
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
    path = out / REPORT_HTML
    atomic_write_text(path, page, durable=True)
    return path
