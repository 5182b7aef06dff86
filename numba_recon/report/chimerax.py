"""``run.cxc``: a ChimeraX command script that shows a run's map the way the report describes it.

``chimerax run.cxc`` (or File > Open in ChimeraX) opens ``run_class001.mrc`` as model #1, draws
its surface at the suggested contour level (:func:`suggested_level`) and centres the view. When a
local-resolution map of the same box is in the run folder (``numba-recon locres ... -o
OUT/locres`` writes ``OUT/locres/locres.mrc``), it is opened as model #2, hidden, and the surface is
coloured by it: blue where the map is best resolved, red where it is worst.

ChimeraX reads relative paths in a command script from the script's own folder, so the script
keeps working when the run folder is moved or copied.
"""

from __future__ import annotations
from numba_recon.io.run_files import CHIMERAX_CXC, MAP

import logging
import math
import os
import shlex
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: File name of the script in the run folder.
CXC_NAME = CHIMERAX_CXC
#: The map the script opens (the FSC-weighted, filtered average of the half maps).
MAP_NAME = MAP
#: Where a local-resolution map of the run is looked for, in this order, relative to the run
#: folder (``numba-recon locres`` names its map ``locres.mrc``, in the folder given with ``-o``);
#: after these, ``*/locres.mrc`` one folder down.
LOCRES_CANDIDATES = ("locres/locres.mrc", "postprocess/locres.mrc", "locres.mrc")
#: Colours of the local-resolution palette, best to worst resolution (ResMap's and RELION's
#: convention: blue is well resolved, red poorly).
LOCRES_COLOURS = ("blue", "cyan", "lime", "yellow", "red")
#: The commands the script uses (a test checks that every line starts with one of them).
VERBS = ("open", "volume", "color", "view", "lighting")


def suggested_level(volume: np.ndarray) -> float:
    """Contour level of a map for a first look: the binarisation threshold of ``numba-recon mask
    --threshold auto``.

    ``level = mu + max(5 sigma, 0.2 (p - mu))`` with ``mu``, ``sigma`` the median and robust
    standard deviation (1.4826 MAD) of the box corners outside the inscribed sphere (solvent for
    any particle that fits its box) and ``p`` the 99.99th percentile of the map
    (:func:`numba_recon.evaluate.mask.auto_threshold`). Why this rule:

    - ``5 sigma`` above the solvent: the surface shows no specks of noise (a Gaussian exceeds
      5 sigma with probability 3e-7), where the usual ``mean + 3 std`` would leave hundreds of
      them in a 128^3 box, and the whole-map ``std`` depends on how much of the box the particle
      fills;
    - the ``20 %`` floor: in a noise-free or strongly low-passed map (simulated data, a map
      filtered at low resolution) ``sigma`` vanishes and a noise-based level would wrap the
      particle in its low-pass halo;
    - a level from the particle's expected volume would need its molecular mass, which a run
      does not know; the level here is reported with the volume it encloses
      (:func:`enclosed_volume_angstrom3`), so a user can compare it with the mass
      (1.21 A^3 per dalton of protein);
    - it is the level the run's masks are made at, so the surface and the mask agree.

    A map with no density above its solvent (all constant, or inverted contrast) gets
    ``mean + 3 std`` instead. The level always lies strictly between the map's minimum and maximum.
    """
    from numba_recon.errors import InputError
    from numba_recon.evaluate.mask import auto_threshold

    v = np.asarray(volume, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    try:
        level = float(auto_threshold(v))
    except InputError:
        level = float(v.mean() + 3.0 * v.std())
    if not (lo < level < hi):
        # a degenerate map: keep the level inside the value range so ChimeraX draws something
        level = lo + 0.5 * (hi - lo)
    return level


def enclosed_volume_angstrom3(volume: np.ndarray, level: float, angpix: float) -> float:
    """Volume (cubic Angstrom) of the voxels above ``level``."""
    return float(np.count_nonzero(np.asarray(volume) > level)) * float(angpix) ** 3


def find_local_resolution(out_dir: str | os.PathLike, box: int) -> Path | None:
    """A local-resolution map of the run (:data:`LOCRES_CANDIDATES`, then ``*/locres.mrc``) whose box
    is the run's, or None."""
    from numba_recon.errors import InputFileError
    from numba_recon.io.mrc import mrc_header

    out = Path(out_dir)
    candidates = [out / name for name in LOCRES_CANDIDATES]
    candidates += sorted(p for p in out.glob("*/locres.mrc") if p not in candidates)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            h = mrc_header(str(path))
        except InputFileError as err:
            log.info("not colouring by %s: %s", path, err.problem)
            continue
        if h.nx == h.ny == h.nz == int(box):
            return path
        log.info("not colouring by %s: box %d differs from the map's %d", path, h.nx, box)
    return None


def resolution_palette(locres: np.ndarray) -> tuple[str, float, float]:
    """ChimeraX palette ``value,colour:...`` over the 2nd to 98th percentile of the local resolution.

    Percentiles instead of the extremes: a few voxels at the mask edge or at the ``--locres_minres``
    cap would otherwise stretch the palette and leave the particle in one colour. Voxels outside the
    mask (0) are ignored. Returns the palette and its range (best, worst) in Angstrom.
    """
    values = np.asarray(locres, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        raise ValueError("the local-resolution map has no positive value")
    best, worst = (float(x) for x in np.percentile(values, [2, 98]))
    if not worst > best:
        worst = best + 0.1
    stops = np.linspace(best, worst, len(LOCRES_COLOURS))
    return ":".join(f"{s:.2f},{c}" for s, c in zip(stops, LOCRES_COLOURS)), best, worst


def _path_arg(path: str) -> str:
    # ChimeraX splits arguments on spaces; quote only when needed, the plain name reads better
    if path and not any(ch.isspace() or ch in "\"';#" for ch in path):
        return path
    return '"' + path.replace('"', '\\"') + '"'


def chimerax_script(level: float, *, map_name: str = MAP_NAME, enclosed_angstrom3: float | None = None,
                    resolution_angstrom: float | None = None, locres_name: str | None = None,
                    palette: str | None = None, locres_range: tuple[float, float] | None = None,
                    version: str | None = None) -> str:
    """The text of ``run.cxc``: comments (lines starting with ``#``) and ChimeraX commands."""
    head = f"numba-recon {version}" if version else "numba-recon"
    lines = [f"# ChimeraX command script written by {head}. Open it in a fresh ChimeraX session:",
             f"#   chimerax {CXC_NAME}      (paths below are relative to this file's folder)"]
    what = f"{map_name}: the FSC-weighted average of the half maps"
    if resolution_angstrom is not None and math.isfinite(resolution_angstrom):
        what += f", low-pass filtered at {resolution_angstrom:.2f} A"
    lines.append(f"# Model #1: {what}.")
    note = f"# Contour level {level:.6g}: solvent median + max(5 robust sigma, 20% of the peak height)"
    if enclosed_angstrom3 is not None:
        note += (f"; encloses {enclosed_angstrom3:,.0f} A^3, the volume of about "
                 f"{enclosed_angstrom3 / 1.21 / 1000:,.0f} kDa of protein at 1.21 A^3/Da")
    lines += [note + ".", f"open {_path_arg(map_name)}", f"volume #1 level {level:.6g} style surface"]
    if locres_name and palette:
        rng = f" from {locres_range[0]:.2f} A (blue) to {locres_range[1]:.2f} A (red)" if locres_range else ""
        lines += [f"# Model #2: local resolution ({locres_name}); the surface is coloured by it{rng}.",
                  f"open {_path_arg(locres_name)}",
                  "volume #2 hide",
                  f"color sample #1 map #2 palette {palette}"]
    lines += ["view", "lighting soft"]
    return "\n".join(lines) + "\n"


def write_chimerax_script(out_dir: str | os.PathLike, volume: np.ndarray | None = None,
                          angpix: float | None = None, resolution_angstrom: float | None = None) -> Path:
    """Write ``OUT/run.cxc`` for the run's ``run_class001.mrc`` (atomic, listed in the output manifest).

    ``volume`` and ``angpix`` default to the map file and its header.
    """
    from numba_recon import __version__
    from numba_recon.io.atomic import atomic_write_text
    from numba_recon.io.mrc import read_volume

    out = Path(out_dir)
    if volume is None or angpix is None:
        volume, header_angpix = read_volume(out / MAP_NAME)
        angpix = angpix or header_angpix or 1.0
    v = np.asarray(volume, dtype=np.float64)
    level = suggested_level(v)
    enclosed = enclosed_volume_angstrom3(v, level, float(angpix))
    locres_name = palette = rng = None
    locres_path = find_local_resolution(out, v.shape[0])
    if locres_path is not None:
        try:
            locres, _ = read_volume(locres_path)
            palette, best, worst = resolution_palette(locres)
            rng = (best, worst)
            locres_name = locres_path.relative_to(out).as_posix()
        except (ValueError, OSError) as err:  # InputFileError is a ValueError
            log.warning("not colouring run.cxc by %s: %s", locres_path, err)
            palette = None
    text = chimerax_script(level, enclosed_angstrom3=enclosed, resolution_angstrom=resolution_angstrom,
                           locres_name=locres_name, palette=palette, locres_range=rng, version=__version__)
    path = out / CXC_NAME
    atomic_write_text(path, text, durable=True)
    return path


def parse_script(text: str) -> list[list[str]]:
    """The commands of a ChimeraX script as argument lists (comments and blank lines dropped).

    A check of form, not ChimeraX's own parser: the tests use it, and a user can call it to see
    what a script will run.
    """
    commands = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        commands.append(shlex.split(line))
    return commands


def describe_script(path: str | os.PathLike) -> str:
    """One line for the report: how to open the script, the contour level it sets and what colours it."""
    commands = parse_script(Path(path).read_text())
    level = next((c[c.index("level") + 1] for c in commands if c[:1] == ["volume"] and "level" in c), None)
    opened = [c[1] for c in commands if c[:1] == ["open"] and len(c) > 1]
    text = f"chimerax {Path(path).name}: {opened[0] if opened else MAP_NAME} as a surface"
    if level is not None:
        text += f" at contour level {level}"
    if any(c[:2] == ["color", "sample"] for c in commands) and len(opened) > 1:
        text += f", coloured by the local resolution in {opened[1]}"
    return text
