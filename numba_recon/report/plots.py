"""The figures of a run folder's ``plots/`` and of ``report.html``.

Every figure is drawn on an explicit Agg canvas with constrained layout and the font sizes below,
so the page reads the same from figure to figure: titles, axis labels, tick labels and legends each
have one size. Legends sit outside the axes, or inside where matplotlib finds the emptiest corner
(``loc="best"``) on a semi-opaque box, so they never hide a curve's label or a marker's value.
Files are written through :func:`numba_recon.evaluate.fsc.save_figure`: under a temporary name, renamed into
place, and listed in the run's output manifest.

The figures:

- ``fsc.png``: gold-standard FSC of the half maps, and, when the true map is known (simulated
  data), the FSC of the map against it (:func:`plot_fsc_curves`);
- ``loss.png``: training and held-out loss, and the half-map resolution, per epoch;
- ``slices.png``: XY, XZ and YZ slices through the box centre and through the map's centre of mass;
- ``projections.png``: sums of the map along Z, Y and X;
- ``directions.png``: the distribution of the particles' viewing directions on the sphere;
- ``scores.png``: per-particle scores (every loss), kept and rejected particles when a robust loss ran.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from numba_recon.checks import finite_above
from numba_recon.errors import InputFileError
from numba_recon.evaluate.fsc import fsc_axes
from numba_recon.evaluate.truth import TRUTH_THRESHOLD
from numba_recon.io.atomic import atomic_write_text
from numba_recon.io.run_files import DATA_STAR, FSC_CSV, HISTORY_CSV, MAP, PLOTS_DIR, SUMMARY_JSON

log = logging.getLogger(__name__)

ANG = "\u00c5"

#: Font sizes (points) of every report figure: one size per role, whatever the figure.
FONT_TITLE = 11
FONT_LABEL = 10
FONT_TICK = 9
FONT_LEGEND = 9
FONT_NOTE = 9
#: Opacity of the legend box: curves behind a legend placed inside the axes stay visible.
LEGEND_ALPHA = 0.85
#: Resolution of the written PNGs (dots per inch).
DPI = 110

_STYLE = {
    "font.size": FONT_LABEL,
    "axes.titlesize": FONT_TITLE,
    "axes.labelsize": FONT_LABEL,
    "xtick.labelsize": FONT_TICK,
    "ytick.labelsize": FONT_TICK,
    "legend.fontsize": FONT_LEGEND,
    "legend.framealpha": LEGEND_ALPHA,
    "legend.frameon": True,
    "figure.titlesize": FONT_TITLE + 1,
    "axes.grid": False,
}



@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The report's font sizes for the figures made inside the block.

    Text sizes are fixed when the artists are created, so the figure must be built (and saved)
    inside this block; the caller's matplotlib settings are restored afterwards.
    """
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _figure(width_in: float, height_in: float):
    # an explicit Agg canvas: works without a display and leaves pyplot's backend alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from numba_recon.evaluate.fsc import save_figure

    return save_figure(fig, path, overwrite=True, dpi=DPI)


def _map_extent(n: int, angpix: float) -> list[float]:
    """``imshow`` extent in Angstrom that puts voxel ``n // 2`` (the box centre, RELION's origin) at 0."""
    lo = (-(n // 2) - 0.5) * angpix
    hi = (n - n // 2 - 0.5) * angpix
    return [lo, hi, lo, hi]


def _signed(value: float) -> str:
    # adding 0.0 turns a rounded -0.0 into 0.0: "+0.0", never "-0.0"
    return f"{round(float(value), 1) + 0.0:+.1f}".replace("-", "\u2212")


# ------------------------------------------------------------------------------------------------
# FSC
# ------------------------------------------------------------------------------------------------

def plot_fsc_curves(curve: np.ndarray, box: int, angpix: float, resolution: float, path: str | os.PathLike,
                    truth_curve: np.ndarray | None = None, truth_resolution: float | None = None) -> Path:
    """Gold-standard FSC of the half maps and, when given, the FSC of the map against the truth.

    The half-map curve is marked at 0.143 (its resolution as a vertical line), the map-vs-truth
    curve at 0.5 (Rosenthal & Henderson 2003: a map against a noise-free reference crosses 0.5 where
    the half maps cross 0.143). The legend sits below the axes and names each resolution.

    Parameters
    ----------
    curve
        ``(box // 2 + 1,)`` half-map FSC.
    box, angpix
        Box size (voxels) and voxel size (Angstrom).
    resolution
        Half-map resolution at 0.143 (Angstrom).
    path
        Output PNG.
    truth_curve, truth_resolution
        FSC of the map against the true map, and its resolution at 0.5 (Angstrom).
    """
    freq = np.arange(box // 2 + 1) / (box * angpix)
    curve = np.asarray(curve, dtype=np.float64)
    with _style():
        fig = _figure(7.4, 5.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhline(0.143, color="0.4", linestyle="--", linewidth=0.9, label="FSC = 0.143")
        ax.plot(freq, curve, color="C0", linewidth=1.8, label="half map 1 vs half map 2 (gold standard)")
        if finite_above(resolution):
            ax.axvline(1.0 / resolution, color="C0", linestyle="-.", linewidth=1.0,
                       label=f"half maps: {resolution:.2f} {ANG} at 0.143")
        lowest = float(np.nanmin(curve))
        if truth_curve is not None:
            truth_curve = np.asarray(truth_curve, dtype=np.float64)
            ax.axhline(TRUTH_THRESHOLD, color="0.4", linestyle=":", linewidth=0.9, label="FSC = 0.5")
            ax.plot(freq, truth_curve, color="C3", linewidth=1.8, label="map vs truth")
            if finite_above(truth_resolution):
                ax.axvline(1.0 / truth_resolution, color="C3", linestyle=(0, (5, 2, 1, 2)), linewidth=1.0,
                           label=f"map vs truth: {truth_resolution:.2f} {ANG} at 0.5")
            lowest = min(lowest, float(np.nanmin(truth_curve)))
        fsc_axes(ax, freq, lowest)
        title = f"Fourier shell correlation: {resolution:.2f} {ANG} (half maps, 0.143)"
        if truth_resolution and np.isfinite(truth_resolution):
            title += f", {truth_resolution:.2f} {ANG} (vs truth, 0.5)"
        ax.set_title(title)
        # below the axes: the curves fill the upper left and the lower right of the plot
        fig.legend(loc="outside lower center", ncols=2)
        return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------------
# Training history
# ------------------------------------------------------------------------------------------------

def plot_loss(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Training and cross-validation loss, and the half-map resolution, against the epoch."""
    epochs = [int(r["epoch"]) for r in history]
    with _style():
        fig = _figure(10, 3.9)
        ax1, ax2 = fig.subplots(1, 2)
        train = [float(r["train_loss"]) for r in history]
        if np.isfinite(train).any():
            ax1.plot(epochs, train, "o-", label="training")
        cv = [float(r["cv_loss"]) for r in history]
        if np.isfinite(cv).any():
            ax1.plot(epochs, cv, "s--", label="cross-validation (held out)")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss per pixel (noise variance units)")
        ax1.set_title("Loss")
        if ax1.get_legend_handles_labels()[0]:
            ax1.legend(loc="best")
        ax1.grid(alpha=0.3)
        res = [float(r["resolution_angstrom"]) for r in history]
        ax2.plot(epochs, res, "o-", color="C2", label=f"FSC 0.143 (last: {res[-1]:.2f} {ANG})")
        ax2.plot(epochs, [float(r["resolution_05_angstrom"]) for r in history], "s--", color="C3", label="FSC 0.5")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(f"half-map resolution ({ANG}, better is lower)")
        ax2.set_title("Resolution")
        ax2.invert_yaxis()
        ax2.legend(loc="best")
        ax2.grid(alpha=0.3)
        for ax in (ax1, ax2):
            ax.xaxis.get_major_locator().set_params(integer=True)
        return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------------
# The map: slices and projections
# ------------------------------------------------------------------------------------------------

#: (plane name, axis index of the slice normal in a [z, y, x] array, normal's letter,
#:  horizontal and vertical axis letters)
_PLANES = (("XY", 0, "z", "X", "Y"), ("XZ", 1, "y", "X", "Z"), ("YZ", 2, "x", "Y", "Z"))


def density_weights(volume: np.ndarray, level: float | None = None) -> np.ndarray:
    """Density above ``level`` (zero below), the weights of the centre of mass and densest planes.

    Solvent noise is symmetric around the solvent level, so plain ``volume`` weights would pull
    the centre of mass to the box centre whatever the particle does; counting only density above
    the contour level weighs the particle alone. ``level`` None: the suggested contour level
    (:func:`numba_recon.report.chimerax.suggested_level`).
    """
    v = np.asarray(volume, dtype=np.float64)
    if level is None:
        from numba_recon.report.chimerax import suggested_level

        level = suggested_level(v)
    return np.clip(v - float(level), 0.0, None)


def centre_of_mass(volume: np.ndarray, level: float | None = None) -> np.ndarray | None:
    """Centre of mass ``(z, y, x)`` in voxels of the density above ``level``; None for an empty map."""
    w = density_weights(volume, level)
    total = float(w.sum())
    if not total > 0:
        return None
    n = w.shape[0]
    idx = np.arange(n, dtype=np.float64)
    return np.array([float((w.sum(axis=(1, 2)) * idx).sum()), float((w.sum(axis=(0, 2)) * idx).sum()),
                     float((w.sum(axis=(0, 1)) * idx).sum())]) / total


def slice_positions(volume: np.ndarray, level: float | None = None) -> list[tuple[int, str]]:
    """For each plane (XY, XZ, YZ): the voxel index of the second-row slice and why it is there
    (``"centre of mass"`` or ``"densest plane"``).

    The slice goes through the centre of mass of the density above the contour level. Where the
    centre of mass lies on the box-centre plane (any particle centred in its box, and most
    symmetric ones), that slice would repeat the first row; the plane with the most density above
    the level along that axis is shown instead, which for a hollow particle (a barrel, a ring, a
    capsid) cuts through the wall rather than the empty middle.
    """
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    w = density_weights(v, level)
    com = centre_of_mass(v, level)
    out = []
    for _name, axis, _normal, _h, _v in _PLANES:
        if com is None:
            out.append((n // 2, "box centre: no density above the level"))
            continue
        k = int(np.clip(np.rint(com[axis]), 0, n - 1))
        if k != n // 2:
            out.append((k, "centre of mass"))
            continue
        other = tuple(a for a in range(3) if a != axis)
        profile = w.sum(axis=other)
        out.append((int(np.argmax(profile)), "densest plane"))
    return out


def plot_map_slices(volume: np.ndarray, angpix: float, path: str | os.PathLike, level: float | None = None,
                    title: str = "Slices of the map") -> Path:
    """XY, XZ and YZ slices through the box centre (top row) and through the centre of mass
    (bottom row, see :func:`slice_positions`), each labelled with its plane and position.

    Axes are in Angstrom from the box centre (voxel ``N // 2``, RELION's origin); one grey scale
    (1st to 99.9th percentile of the map) and one colour bar for all six panels, so the densities
    compare directly. The top-row panels mark the centre of mass with a red cross.
    """
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    extent = _map_extent(n, angpix)
    lo, hi = np.percentile(v, [1, 99.9])
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max()) + 1e-12
    com = centre_of_mass(v, level)
    second = slice_positions(v, level)
    c = n // 2
    with _style():
        fig = _figure(11, 7.8)
        axes = fig.subplots(2, 3)
        im = None
        for col, (name, axis, normal, hname, vname) in enumerate(_PLANES):
            for row, (k, why) in enumerate(((c, "box centre"), second[col])):
                ax = axes[row, col]
                img = np.take(v, k, axis=axis)
                im = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                               interpolation="nearest")
                ax.set_title(f"{name} plane at {normal} = {_signed((k - c) * angpix)} {ANG}\n({why})")
                ax.set_xlabel(f"{hname} ({ANG})")
                ax.set_ylabel(f"{vname} ({ANG})")
                if row == 0 and com is not None:
                    # the centre of mass projected onto the plane: (horizontal, vertical) in Angstrom
                    zyx = (com - c) * angpix
                    h_axis, v_axis = {0: (2, 1), 1: (2, 0), 2: (1, 0)}[axis]
                    ax.plot([zyx[h_axis]], [zyx[v_axis]], marker="+", color="red", markersize=10,
                            markeredgewidth=1.5, linestyle="none",
                            label="centre of mass" if col == 0 else None)
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="density (map units)")
        if com is not None:
            fig.legend(loc="outside lower center")
            x, y, z = ((com[::-1] - c) * angpix).tolist()
            title += f": centre of mass at (x, y, z) = ({_signed(x)}, {_signed(y)}, {_signed(z)}) {ANG}"
        fig.suptitle(title)
        return _save(fig, Path(path))


def plot_map_projections(volume: np.ndarray, angpix: float, path: str | os.PathLike,
                         title: str = "Projections of the map") -> Path:
    """Front (sum along Z) and side (sums along Y and X) projections, axes in Angstrom."""
    v = np.asarray(volume, dtype=np.float64)
    extent = _map_extent(v.shape[0], angpix)
    views = (("front: sum along Z", 0, "X", "Y"), ("side: sum along Y", 1, "X", "Z"),
             ("side: sum along X", 2, "Y", "Z"))
    with _style():
        fig = _figure(11, 4.1)
        axes = fig.subplots(1, 3)
        for ax, (name, axis, hname, vname) in zip(axes, views):
            ax.imshow(v.sum(axis=axis), cmap="gray", origin="lower", extent=extent)
            ax.set_title(name)
            ax.set_xlabel(f"{hname} ({ANG})")
            ax.set_ylabel(f"{vname} ({ANG})")
        fig.suptitle(title)
        return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------------
# Viewing directions
# ------------------------------------------------------------------------------------------------

def directions_from_angles(rot_deg: np.ndarray, tilt_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (radians) of the viewing directions of RELION angles.

    The viewing direction of a particle is the map-frame direction its projection runs along:
    the third row of RELION's matrix ``A``, ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``.
    Longitude is ``rot`` wrapped to [-180, 180) degrees, latitude ``90 - tilt``; going through the
    vector also folds tilts outside [0, 180] (written by some programs) onto the sphere.
    """
    rot = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    tilt = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    d = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], axis=-1)
    return directions_from_vectors(d)


def directions_from_vectors(directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (radians) of ``(n, 3)`` direction vectors (any length > 0)."""
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    norm = np.linalg.norm(d, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    d = d[ok] / norm[ok, None]
    lon = np.arctan2(d[:, 1], d[:, 0])
    lat = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    return lon, lat


def direction_histogram(lon: np.ndarray, lat: np.ndarray, mean_per_bin: float = 10.0,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of directions in equal-area bins of the sphere.

    Latitude bins are equally spaced in ``sin(latitude)`` and longitude bins in angle, so every
    bin covers the same solid angle and a uniform distribution gives a flat map (a plain rot/tilt
    grid would crowd the poles). The grid has ``2 m x m`` bins with ``m`` chosen for about
    ``mean_per_bin`` particles per bin, between 6 (30 degree bins) and 36 (5 degree bins): a
    small data set is not drowned in Poisson noise, a large one is resolved finely.

    Returns
    -------
    lon_edges, lat_edges, counts
        ``(2m + 1,)`` and ``(m + 1,)`` bin edges in radians, ``(m, 2m)`` counts ``[lat, lon]``.
    """
    n = int(np.size(lon))
    m = int(np.clip(np.rint(np.sqrt(max(n, 1) / (2.0 * mean_per_bin))), 6, 36))
    lon_edges = np.linspace(-np.pi, np.pi, 2 * m + 1)
    lat_edges = np.arcsin(np.linspace(-1.0, 1.0, m + 1))
    counts, _, _ = np.histogram2d(np.asarray(lat), np.asarray(lon), bins=[lat_edges, lon_edges])
    return lon_edges, lat_edges, counts


def plot_viewing_directions(lon: np.ndarray, lat: np.ndarray, path: str | os.PathLike,
                            symmetry: str | None = None) -> Path:
    """Mollweide map of the particles' viewing directions, coloured by particles per bin.

    The Mollweide projection keeps areas, so with the equal-area bins of
    :func:`direction_histogram` the colour is the density of views, as RELION's and cryoSPARC's
    angular distribution plots: a preferred orientation shows as a hot spot, a missing view as a
    dark region. The title gives the share of empty bins and the densest bin relative to the mean,
    two numbers that flag a preferred orientation at a glance.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    lon_edges, lat_edges, counts = direction_histogram(lon, lat)
    nbins = counts.size
    bin_deg2 = 4 * np.pi / nbins * (180 / np.pi) ** 2
    mean = counts.mean() if nbins else 0.0
    empty = 100.0 * float(np.mean(counts == 0)) if nbins else 100.0
    peak = float(counts.max() / mean) if mean > 0 else float("nan")
    with _style():
        fig = _figure(9.2, 5.4)
        ax = fig.add_subplot(1, 1, 1, projection="mollweide")
        mesh = ax.pcolormesh(lon_edges, lat_edges, counts, cmap="viridis", vmin=0, shading="flat")
        ax.set_xticks(np.deg2rad([-120, -60, 0, 60, 120]))
        ax.set_yticks(np.deg2rad([-60, -30, 0, 30, 60]))
        ax.tick_params(axis="x", colors="white", labelsize=FONT_TICK)
        ax.tick_params(axis="y", labelsize=FONT_TICK)
        ax.grid(alpha=0.35, color="white")
        ax.set_xlabel("rot: azimuth of the viewing direction (degrees)")
        ax.set_ylabel("90\u00b0 \u2212 tilt: elevation (degrees)")
        fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, pad=0.02,
                     label=f"particles per bin (equal-area bins of {bin_deg2:.0f} square degrees)")
        sym = f", symmetry {symmetry}" if symmetry and str(symmetry).upper() != "C1" else ""
        ax.set_title(f"Viewing directions of {lon.size} particles{sym}\n"
                     f"{empty:.0f}% of the sphere without particles; densest bin {peak:.1f} \u00d7 the mean",
                     pad=14)
        return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------------
# Per-particle scores
# ------------------------------------------------------------------------------------------------

def plot_scores(scores: np.ndarray, kept: np.ndarray | None, path: str | os.PathLike, loss: str) -> Path:
    """Histogram of per-particle scores against the final half maps, for any loss.

    ``kept`` (a robust loss): kept and down-weighted or rejected particles stacked in two colours,
    with their numbers in the legend. None (the L2 loss weighs every particle the same): one
    histogram of all particles. The score is ``(loss - ||image||^2) / ||model image||^2``: -1 for
    a perfect fit, about +1 for an image with nothing of the model in it.
    """
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    with _style():
        fig = _figure(7.4, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        if ok.any():
            bins = np.histogram_bin_edges(s[ok], bins=60)
            if kept is None:
                ax.hist(s[ok], bins=bins, color="C0", alpha=0.85,
                        label=f"all particles ({int(ok.sum())}, all weighted equally)")
            else:
                k = np.asarray(kept, dtype=bool)
                ax.hist([s[ok & k], s[ok & ~k]], bins=bins, stacked=True, color=["C0", "C3"], alpha=0.85,
                        label=[f"kept ({int(np.sum(ok & k))})",
                               f"down-weighted or rejected ({int(np.sum(ok & ~k))})"])
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no finite scores", transform=ax.transAxes, ha="center", va="center",
                    fontsize=FONT_NOTE)
        ax.set_xlabel("score (\u22121 = perfect fit; lower is better)")
        ax.set_ylabel("particles")
        ax.set_title(f"Per-particle scores against the final half maps ({loss} loss)")
        ax.grid(alpha=0.3)
        return _save(fig, Path(path))


def draw_figures(plots_dir: str | os.PathLike, *, box: int, angpix: float, fsc_curve: np.ndarray | None = None,
                 resolution: float = float("nan"), truth_curve: np.ndarray | None = None,
                 truth_resolution: float | None = None, history: Sequence[dict[str, Any]] | None = None,
                 volume: np.ndarray | None = None, directions: tuple[np.ndarray, np.ndarray] | None = None,
                 symmetry: str | None = None, scores: np.ndarray | None = None, kept: np.ndarray | None = None,
                 loss: str = "l2") -> list[Path]:
    """Draw every figure whose input is given into ``plots_dir``; returns the files written.

    One entry point for the run (inputs in memory) and ``numba-recon report`` (inputs read from the
    run folder), so both draw the same figures. ``directions``: longitude and latitude in radians
    (:func:`directions_from_angles`); ``kept``: None for the L2 loss (one histogram of scores).
    """
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    if fsc_curve is not None and np.size(fsc_curve) == box // 2 + 1:
        written.append(plot_fsc_curves(fsc_curve, box, angpix, resolution, plots / "fsc.png",
                                       truth_curve=truth_curve, truth_resolution=truth_resolution))
    if history:
        written.append(plot_loss(history, plots / "loss.png"))
    if volume is not None:
        written.append(plot_map_slices(volume, angpix, plots / "slices.png"))
        written.append(plot_map_projections(volume, angpix, plots / "projections.png"))
    if directions is not None and np.size(directions[0]):
        written.append(plot_viewing_directions(directions[0], directions[1], plots / "directions.png", symmetry))
    if scores is not None and np.size(scores):
        written.append(plot_scores(scores, kept, plots / "scores.png", loss))
    return written


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
    from numba_recon.evaluate import truth as truth_maps

    out = Path(out_dir)
    summary = json.loads((out / SUMMARY_JSON).read_text())
    box = int(summary["box_size"])
    angpix = float(summary["pixel_size_angstrom"])
    res = float(summary.get("resolution_angstrom", float("nan")))
    curve = None
    if (out / FSC_CSV).is_file():
        curve = np.array([r["fsc"] for r in _read_csv_rows(out / FSC_CSV)])
    truth_entry, truth_curve = truth_maps.truth_for_folder(out, summary, truth)
    if truth_entry and truth_entry != summary.get("truth"):
        summary["truth"] = truth_entry
        summary.setdefault("outputs", {})["fsc_truth"] = truth_entry["fsc"]
        atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n",
                          durable=True)
    history = _read_csv_rows(out / HISTORY_CSV) if (out / HISTORY_CSV).is_file() else None
    volume = None
    if (out / MAP).is_file():
        from numba_recon.io.mrc import read_volume

        volume, _ = read_volume(out / MAP)
    loss = str(summary.get("config", {}).get("loss", "l2"))
    directions = scores = kept = None
    if (out / DATA_STAR).is_file():
        import starfile

        tables = starfile.read(out / DATA_STAR, always_dict=True)
        table = tables.get("particles", next(iter(tables.values())))
        if "rlnAngleRot" in table and "rlnAngleTilt" in table:
            directions = directions_from_angles(table["rlnAngleRot"].to_numpy(dtype=np.float64),
                                                        table["rlnAngleTilt"].to_numpy(dtype=np.float64))
        from numba_recon.io.star import read_particle_scores

        # run_data_scores.csv beside it, or the score columns of a run_data.star from before that table
        try:
            found = read_particle_scores(out / DATA_STAR, table) if "rlnImageName" in table else None
        except InputFileError as err:  # a score table that does not fit: draw the rest
            log.warning("no score plot: %s", err)
            found = None
        if found is not None and "score" in found:
            scores = found["score"].to_numpy(dtype=np.float64)
            if loss != "l2" and "kept" in found:
                kept = found["kept"].to_numpy() > 0
    return draw_figures(
        out / PLOTS_DIR, box=box, angpix=angpix, fsc_curve=curve, resolution=res, truth_curve=truth_curve,
        truth_resolution=truth_entry["resolution_angstrom"] if truth_entry else None, history=history,
        volume=volume, directions=directions, symmetry=summary.get("config", {}).get("symmetry"), scores=scores,
        kept=kept, loss=loss)


