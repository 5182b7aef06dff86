"""Plausibility of particle metadata: implausible physics is warned about, impossible physics refused.

The format readers refuse what cannot be parsed or converted; this module judges the physics of
what they read. A value that cannot be physical (a voltage or pixel size that is not positive, an
amplitude contrast outside ``[0, 1)``, an origin that puts the particle several boxes away from
its image) raises :class:`~numba_recon.errors.InputFileError`. A value that is physical but
implausible (a pixel size of 1e-6 A, 1 V acceleration, Cs of 1e12 mm, negative defocus, THUNDER
volts given in kV) is reported with one warning per column that counts the particles, gives the
range found and the plausible range, and names the column as the file names it (RELION label or
THUNDER column). Simulated data and real data sets must pass without a warning, so the ranges
are wide: they catch wrong units and wrong signs, not unusual microscopes.

The ranges (file units in ``docs/plausibility.md``):

===================  =====================  ===========================================
quantity             plausible              refused
===================  =====================  ===========================================
pixel size           0.1 to 20 A            <= 0 or not finite
voltage              60 to 1000 kV          <= 0 or not finite
Cs                   0 to 10 mm             not finite
defocus U, V         0 to 100000 A          not finite
amplitude contrast   0 to 0.5               < 0, >= 1 or not finite
origin x, y          within half the box    beyond 2 box sizes, or not finite
===================  =====================  ===========================================
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from numba_recon.checks import finite_above
from numba_recon.errors import InputFileError
from numba_recon.particles import ParticleSet

__all__ = [
    "AMPLITUDE_CONTRAST_RANGE",
    "CS_RANGE_MM",
    "DEFOCUS_RANGE_ANGSTROM",
    "ORIGIN_REFUSE_BOXES",
    "ORIGIN_WARN_BOXES",
    "PIXEL_SIZE_RANGE_ANGSTROM",
    "VOLTAGE_RANGE_KV",
    "check_plausibility",
    "drop_impossible",
]

log = logging.getLogger(__name__)

#: Super-resolution images at the highest magnifications reach ~0.25 A/px; 8x binned data of large
#: particles ~10 A/px. Beyond 20 A/px Nyquist is 40 A, coarser than any map worth reconstructing.
PIXEL_SIZE_RANGE_ANGSTROM = (0.1, 20.0)
#: Cryo-EM microscopes run at 100 to 300 kV; low-voltage (60-80 kV) and high-voltage (1 MV)
#: instruments exist. 1 V or 0.3 kV is a unit slip, not a microscope.
VOLTAGE_RANGE_KV = (60.0, 1000.0)
#: Uncorrected objective lenses have Cs of 1 to ~6 mm, Cs-corrected ones ~0.
CS_RANGE_MM = (0.0, 10.0)
#: RELION's defocus is positive for underfocus; data are taken at 0.3 to ~5 um (tomography up to
#: ~10 um). Overfocus (negative) is rare; more often a sign convention opposite to RELION's.
DEFOCUS_RANGE_ANGSTROM = (0.0, 1.0e5)
#: 0.07 to 0.1 in vitreous ice, up to ~0.35 in negative stain.
AMPLITUDE_CONTRAST_RANGE = (0.0, 0.5)
#: Beyond half the box the particle centre lies outside its image.
ORIGIN_WARN_BOXES = 0.5
#: Beyond two box sizes no part of a particle that fits its box can be in the image.
ORIGIN_REFUSE_BOXES = 2.0
# every particle's defocus in (0, 10] A: micrometres written where Angstrom are expected
_DEFOCUS_MICROMETRE_LIMIT = 10.0


@dataclass(frozen=True)
class _Column:
    """One checked column, as the file names it."""

    label: str
    unit: str
    factor: float  # value in the file = value in numba-recon's unit x factor
    values: np.ndarray  # in numba-recon's unit (kV, mm, A, fraction, px)
    internal_unit: str
    # the file's own values where they are not ``values x factor`` (origins in Angstrom)
    raw: np.ndarray | None = None

    @property
    def file_values(self) -> np.ndarray:
        return self.values * self.factor

    def outside(self, lo: float, hi: float) -> np.ndarray:
        """Boolean mask of the values below ``lo`` or above ``hi`` (numba-recon's unit; NaN is not outside)."""
        return (self.values < lo) | (self.values > hi)

    def span(self, lo: float, hi: float) -> str:
        """``lo to hi unit`` in the file's unit, with numba-recon's unit in parentheses when they differ."""
        text = f"{_g(lo * self.factor)} to {_g(hi * self.factor)} {self.unit}".rstrip()
        if self.factor != 1.0:
            text += f" ({_g(lo)} to {_g(hi)} {self.internal_unit})"
        return text

    def found(self, mask: np.ndarray) -> str:
        """The range of the values at ``mask`` in the file's unit (and in pixels for origins in Angstrom)."""
        mask = mask & np.isfinite(self.values)
        if not mask.any():
            return "not finite"
        if self.raw is not None:
            return f"{_found(self.raw[mask], 'A')}, {_found(self.values[mask], 'px')}"
        return _found(self.file_values[mask], self.unit)


def _g(value: float) -> str:
    return f"{float(value):.6g}"


def _found(values: np.ndarray, unit: str) -> str:
    lo, hi = float(np.min(values)), float(np.max(values))
    text = _g(lo) if lo == hi else f"{_g(lo)} to {_g(hi)}"
    return f"{text} {unit}".rstrip()


def _is_thu(particles: ParticleSet) -> bool:
    return particles.meta.get("format") == "thu"


def _columns(particles: ParticleSet) -> dict[str, _Column]:
    """The checked columns named and scaled as the particle file has them."""
    ctf = particles.ctf
    shifts = np.asarray(particles.shifts_px, dtype=np.float64).reshape(-1, 2)
    if _is_thu(particles):
        return {
            "voltage": _Column("VOLTAGE (column 0)", "V", 1000.0, ctf["voltage_kv"], "kV"),
            "cs": _Column("CS (column 4)", "A", 1e7, ctf["cs_mm"], "mm"),
            "defocus_u": _Column("DEFOCUS_U x DEFOCUS_FACTOR (columns 1, 24)", "A", 1.0,
                                 ctf["defocus_u_angstrom"], "A"),
            "defocus_v": _Column("DEFOCUS_V x DEFOCUS_FACTOR (columns 2, 24)", "A", 1.0,
                                 ctf["defocus_v_angstrom"], "A"),
            "amplitude_contrast": _Column("AMPLITUTDE_CONTRAST (column 5)", "", 1.0, ctf["amplitude_contrast"], ""),
            # THUNDER's translation is minus RELION's origin
            "origin_x": _Column("TRANSLATION_X (column 20)", "px", -1.0, shifts[:, 0], "px"),
            "origin_y": _Column("TRANSLATION_Y (column 21)", "px", -1.0, shifts[:, 1], "px"),
        }
    columns = set(particles.table.columns)
    out = {
        "voltage": _Column("rlnVoltage", "kV", 1.0, ctf["voltage_kv"], "kV"),
        "cs": _Column("rlnSphericalAberration", "mm", 1.0, ctf["cs_mm"], "mm"),
        "defocus_u": _Column("rlnDefocusU", "A", 1.0, ctf["defocus_u_angstrom"], "A"),
        "amplitude_contrast": _Column("rlnAmplitudeContrast", "", 1.0, ctf["amplitude_contrast"], ""),
    }
    # without rlnDefocusV the reader copies U: checking it again would report U twice
    if "rlnDefocusV" in columns or "rlnDefocusU" not in columns:
        out["defocus_v"] = _Column("rlnDefocusV", "A", 1.0, ctf["defocus_v_angstrom"], "A")
    if "rlnOriginXAngst" in columns or "rlnOriginX" not in columns:
        # judged in pixels (what the box is measured in), shown in both
        for key, label, axis in (("origin_x", "rlnOriginXAngst", 0), ("origin_y", "rlnOriginYAngst", 1)):
            raw = None
            if label in columns and len(particles.table) == len(shifts):
                raw = pd.to_numeric(particles.table[label], errors="coerce").to_numpy(dtype=np.float64)
            out[key] = _Column(label, "px", 1.0, shifts[:, axis], "px", raw)
    else:
        out["origin_x"] = _Column("rlnOriginX", "px", 1.0, shifts[:, 0], "px")
        out["origin_y"] = _Column("rlnOriginY", "px", 1.0, shifts[:, 1], "px")
    return out


def _pixel_size_label(particles: ParticleSet) -> str:
    source = particles.meta.get("pixel_size_source")
    if source:
        return str(source)
    return "rlnImagePixelSize" if particles.optics is not None else "pixel size"


def _first_image(particles: ParticleSet, mask: np.ndarray) -> str:
    i = int(np.flatnonzero(mask)[0])
    if "rlnImageName" in particles.table.columns and i < len(particles.table):
        return f"first: {particles.table['rlnImageName'].iloc[i]}"
    return f"first: particle {i + 1}"


# --------------------------------------------------------------------------------------------
# impossible values: refused
# --------------------------------------------------------------------------------------------

def _pixel_size_problem(particles: ParticleSet) -> tuple[str, str] | None:
    px = float(particles.pixel_size_angstrom)
    if finite_above(px):
        return None
    label = _pixel_size_label(particles)
    return (f"{label}: pixel size {_g(px)} A is not a positive length",
            "give the pixel size in Angstrom (plausible: "
            f"{_g(PIXEL_SIZE_RANGE_ANGSTROM[0])} to {_g(PIXEL_SIZE_RANGE_ANGSTROM[1])} A)")


def _impossible_rows(particles: ParticleSet, cols: dict[str, _Column]) -> list[tuple[np.ndarray, str, str]]:
    """Per-particle impossible values: ``(mask, problem, fix)`` per column, in column order."""
    n = len(particles)
    found: list[tuple[np.ndarray, str, str]] = []

    def add(mask: np.ndarray, col: _Column, problem: str, fix: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            text = (f"{col.label}: {int(mask.sum())} of {n} particles {problem} "
                    f"(found {col.found(mask)}; {_first_image(particles, mask)})")
            found.append((mask, text, fix))

    for col in cols.values():
        add(~np.isfinite(col.values), col, "have a value that is not a finite number", "correct the column")

    v = cols["voltage"]
    add(np.isfinite(v.values) & (v.values <= 0), v, "have an acceleration voltage that is not positive",
        f"give the voltage in {v.unit} (plausible: {v.span(*VOLTAGE_RANGE_KV)})")
    q = cols["amplitude_contrast"]
    add(np.isfinite(q.values) & ((q.values < 0) | (q.values >= 1)), q,
        "have an amplitude contrast outside [0, 1), which no specimen has",
        "give the amplitude contrast as a fraction (plausible: "
        f"{_g(AMPLITUDE_CONTRAST_RANGE[0])} to {_g(AMPLITUDE_CONTRAST_RANGE[1])}, typically 0.1)")

    box = float(particles.box_size)
    limit = ORIGIN_REFUSE_BOXES * box
    for key in ("origin_x", "origin_y"):
        o = cols[key]
        far = np.isfinite(o.values) & (np.abs(o.values) > limit)
        if far.any():
            add(far, o, f"have {_shift_word(o, article=True)} more than {_g(ORIGIN_REFUSE_BOXES)} box sizes "
                f"({_g(limit)} px) from the box centre, so the particle cannot be in its image",
                _origin_fix(particles, o, far))
    return found


def _shift_word(col: _Column, article: bool = False) -> str:
    """What the file calls a particle's shift: THUNDER a translation (minus RELION's origin)."""
    word = "translation" if col.label.startswith("TRANSLATION") else "origin"
    return f"{'a' if word == 'translation' else 'an'} {word}" if article else word


def _origin_fix(particles: ParticleSet, col: _Column, mask: np.ndarray) -> str:
    word = _shift_word(col)
    plausible = f"plausible {word}s: within +-{_g(ORIGIN_WARN_BOXES * particles.box_size)} px"
    if col.raw is None:
        return f"correct the {word}s ({plausible})"
    fix = "correct rlnOriginXAngst/rlnOriginYAngst (Angstrom) or the pixel size they are divided by"
    # the file's pixel size (the one the reader divided by, even under --angpix): Angstrom / px
    ratio = col.raw[mask] / col.values[mask]
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    lo, hi = PIXEL_SIZE_RANGE_ANGSTROM
    if ratio.size:
        px = float(np.median(ratio))
        if not lo <= px <= hi:
            fix += f", {_g(px)} A, itself outside the plausible range {_g(lo)} to {_g(hi)} A"
    return f"{fix} ({plausible})"


def _raise_impossible(particles: ParticleSet, path: str | os.PathLike | None,
                      cols: dict[str, _Column]) -> None:
    problem = _pixel_size_problem(particles)
    if problem is not None:
        raise InputFileError(problem[0], path, problem[1])
    rows = _impossible_rows(particles, cols)
    if rows:
        _, text, fix = rows[0]
        raise InputFileError(text, path, fix)


def drop_impossible(particles: ParticleSet, path: str | os.PathLike | None) -> ParticleSet:
    """Permissive mode: the particles without impossible values, the others dropped with one
    ``RuntimeWarning`` (as the readers do). A pixel size that is not positive still raises.

    Raises
    ------
    InputFileError
        Impossible pixel size, or no particle left.
    """
    problem = _pixel_size_problem(particles)
    if problem is not None:
        raise InputFileError(problem[0], path, problem[1])
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        rows = _impossible_rows(particles, _columns(particles))
    if not rows:
        return particles
    bad = np.zeros(len(particles), dtype=bool)
    for mask, _, _ in rows:
        bad |= mask
    notes = "; ".join(text for _, text, _ in rows[:5]) + ("; ..." if len(rows) > 5 else "")
    if bad.all():
        raise InputFileError(f"no usable particles left after dropping impossible values: {notes}", path,
                             rows[0][2])
    prefix = f"{os.fspath(path)}: " if path is not None else ""
    msg = f"{prefix}skipped {int(bad.sum())} of {len(bad)} particles with impossible values: {notes}"
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    log.warning(msg)
    return particles.subset(~bad)


# --------------------------------------------------------------------------------------------
# implausible values: one warning per column
# --------------------------------------------------------------------------------------------

def _outside(col: _Column, lo: float, hi: float, n: int, why: str) -> str | None:
    """``label: k of n particles outside lo to hi unit (found ...)`` plus ``why``, or None."""
    mask = col.outside(lo, hi)
    if not mask.any():
        return None
    return (f"{col.label}: {int(mask.sum())} of {n} particles outside the plausible range {col.span(lo, hi)} "
            f"(found {col.found(mask)}); {why}")


def _unit_slip(values: np.ndarray, lo: float, hi: float, candidates: tuple[tuple[float, str], ...]) -> str | None:
    """The first ``(multiplier, text)`` that brings every value into ``[lo, hi]``: its text."""
    for multiplier, text in candidates:
        scaled = values * multiplier
        if np.all((scaled >= lo) & (scaled <= hi)) and np.any(scaled != 0):
            return text
    return None


def _pixel_size_warning(particles: ParticleSet) -> str | None:
    px = float(particles.pixel_size_angstrom)
    lo, hi = PIXEL_SIZE_RANGE_ANGSTROM
    if lo <= px <= hi:
        return None
    label = _pixel_size_label(particles)
    why = (f"the {particles.box_size}-px box would be {_g(px * particles.box_size)} A wide, "
           f"{'too small to hold a molecule' if px < lo else 'wider than any single particle'}")
    if label == "rlnDetectorPixelSize/rlnMagnification":
        why += "; rlnDetectorPixelSize is in micrometres and rlnMagnification is the magnification at the detector"
    elif label == "--angpix":
        why += "; give --angpix in Angstrom per pixel"
    else:
        why += f"; {label} is in Angstrom per pixel"
    return f"{label}: pixel size {_g(px)} A is outside the plausible range {_g(lo)} to {_g(hi)} A; {why}"


def _warnings(particles: ParticleSet, cols: dict[str, _Column]) -> list[str]:
    n = len(particles)
    thu = _is_thu(particles)
    found: list[str] = []

    def keep(text: str | None) -> None:
        if text is not None:
            found.append(text)

    keep(_pixel_size_warning(particles))

    v = cols["voltage"]
    lo, hi = VOLTAGE_RANGE_KV
    mask = v.outside(lo, hi)
    if mask.any():
        if thu:
            why = "THUNDER's VOLTAGE is in volts (300 kV is 300000 V)"
            raw = v.file_values[mask]
            if np.all((raw >= lo) & (raw <= hi)):  # read as kV they would be plausible
                why += ": these values look like kV"
        else:
            why = "rlnVoltage is in kV"
        keep(_outside(v, lo, hi, n, why + "; cryo-EM microscopes run at 100 to 300 kV"))

    c = cols["cs"]
    lo, hi = CS_RANGE_MM
    mask = c.outside(lo, hi)
    if mask.any():
        if thu:
            why = "THUNDER's CS is in Angstrom (2.7 mm is 27000000 A)"
        else:
            slip = _unit_slip(c.values[mask], lo, hi, ((1e-3, "micrometres"), (1e-7, "Angstrom")))
            why = "rlnSphericalAberration is in mm" + (f"; these values look like {slip}" if slip else "")
        if np.any(c.values[mask] < 0):
            why += "; a negative Cs needs an aberration corrector set for negative-Cs imaging"
        keep(_outside(c, lo, hi, n, why + "; uncorrected microscopes have 1 to 6 mm, Cs-corrected ones about 0"))
    elif thu:
        # mm written where THUNDER expects Angstrom: 2.7 reads as 2.7e-7 mm, inside the range
        mm_like = (c.file_values > 0) & (c.file_values <= hi)
        if mm_like.any():
            keep(f"{c.label}: {int(mm_like.sum())} of {n} particles have CS {_found(c.file_values[mm_like], 'A')}, "
                 f"which look like mm: THUNDER's CS is in Angstrom, 2.7 mm is 27000000 A (plausible range "
                 f"{c.span(lo, hi)}, about 0 for a Cs-corrected microscope)")

    lo, hi = DEFOCUS_RANGE_ANGSTROM
    for key in ("defocus_u", "defocus_v"):
        if key not in cols:
            continue
        d = cols[key]
        mask = d.outside(lo, hi)
        if mask.any():
            reasons = []
            if np.any(d.values < lo):
                reasons.append("defocus is positive for underfocus (RELION's convention): negative values are "
                               "overfocus (rare) or a sign convention opposite to RELION's")
            if np.any(d.values > hi):
                reasons.append(f"more than {_g(hi / 1e4)} um of defocus is beyond what is used for imaging")
            keep(_outside(d, lo, hi, n, "; ".join(reasons)))
        elif np.mean(d.values == 0) > 0.5:
            # in focus, a phase-contrast image has almost no low-resolution contrast: a zero column is a
            # missing value far more often than a choice (a phase plate says so in rlnPhaseShift)
            zero = int(np.sum(d.values == 0))
            keep(f"{d.label}: {zero} of {n} particles have a defocus of exactly 0 A: images in focus carry almost "
                 "no low-resolution contrast, and a CTF that does not match the images gives half maps that agree "
                 "with each other but not with the particle; check that the column holds the CTF estimates "
                 f"(plausible: a few thousand to {_g(hi)} A)")
        elif np.all((d.values > 0) & (d.values <= _DEFOCUS_MICROMETRE_LIMIT)):
            keep(f"{d.label}: all {n} particles have a defocus of {_found(d.values, 'A')}, which look like "
                 f"micrometres: defocus is in Angstrom (1.5 um is 15000 A; plausible: {_g(lo)} to {_g(hi)} A)")

    q = cols["amplitude_contrast"]
    keep(_outside(q, *AMPLITUDE_CONTRAST_RANGE, n,
                  "the amplitude contrast is a fraction, 0.07 to 0.1 in vitreous ice and up to about 0.35 in "
                  "negative stain"))

    half = ORIGIN_WARN_BOXES * float(particles.box_size)
    for key in ("origin_x", "origin_y"):
        o = cols[key]
        mask = np.abs(o.values) > half
        if mask.any():
            found.append(f"{o.label}: {int(mask.sum())} of {n} particles have {_shift_word(o, article=True)} "
                         "beyond half the box "
                         f"(found {o.found(mask)}; plausible: within +-{_g(half)} px), "
                         "so the particle centre lies outside its image"
                         + ("; the origin in Angstrom is divided by the file's pixel size"
                            if o.label.endswith("Angst") else ""))
    return found


def check_plausibility(particles: ParticleSet, path: str | os.PathLike | None) -> list[str]:
    """Refuse impossible particle metadata; warn once per column about implausible metadata.

    Parameters
    ----------
    particles
        A set from a reader (``meta["format"]`` ``"star"`` or ``"thu"`` decides the column names
        and units in the messages) or the simulator.
    path
        The particle file, named in every message.

    Returns
    -------
    list of str
        The warnings logged (each also on ``logging.getLogger(__name__)``), also stored in
        ``particles.meta["plausibility_warnings"]``; empty for plausible data.

    Raises
    ------
    InputFileError
        A value that cannot be physical: pixel size or voltage not positive, amplitude contrast
        outside ``[0, 1)``, a value that is not finite, an origin beyond
        :data:`ORIGIN_REFUSE_BOXES` box sizes. Nothing is logged before raising, so the command
        line prints the error as its only line.
    """
    if len(particles) == 0:
        return []
    # absurd values (1e300 A) overflow when scaled for a message: inf is printed, not raised
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        cols = _columns(particles)
        _raise_impossible(particles, path, cols)
        found = _warnings(particles, cols)
    prefix = f"{os.fspath(path)}: " if path is not None else ""
    found = [prefix + text for text in found]
    for text in found:
        log.warning(text)
    particles.meta["plausibility_warnings"] = list(found)
    return found
