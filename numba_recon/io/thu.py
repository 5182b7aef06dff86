"""THUNDER ``.thu`` particle files: 27 whitespace-separated columns per particle.

Columns (0-based, THUNDER ``include/Database.h``) and their conversion to numba-recon's units:

==  ======================  ====================  =========================================
 0  VOLTAGE                 V                     ``voltage_kv = col0 / 1000``
 1  DEFOCUS_U               Angstrom              ``defocus_u = col1 * col24``
 2  DEFOCUS_V               Angstrom              ``defocus_v = col2 * col24``
 3  DEFOCUS_THETA           rad                   ``defocus_angle_deg = degrees(col3)``
 4  CS                      Angstrom              ``cs_mm = col4 / 1e7``
 5  AMPLITUTDE_CONTRAST     fraction              unchanged
 6  PHASE_SHIFT             rad                   ``phase_shift_deg = degrees(col6)``
 7  PARTICLE_PATH           ``index@stack``       1-based index
 8  MICROGRAPH_PATH         path                  ``rlnMicrographName``
 9  COORDINATE_X            px                    ``rlnCoordinateX``
10  COORDINATE_Y            px                    ``rlnCoordinateY``
11  GROUP_ID                int                   ``rlnGroupNumber``
12  CLASS_ID                int, 0-based          ``class_number = col12 + 1``
13  QUATERNION_0..3         unit ``(w, x, y, z)``  ``A = R(q)^T`` (RELION matrix)
17  K1..K3                  ACG concentrations    kept as ``thuK1..thuK3``
20  TRANSLATION_X, _Y       px                    ``origin = -translation``
22  STD_TRANSLATION_X, _Y   px                    kept as ``thuStdTranslationX/Y``
24  DEFOCUS_FACTOR          factor                multiplied into defocus U and V
25  STD_DEFOCUS_FACTOR      -                     kept as ``thuStdDefocusFactor``
26  SCORE                   -                     kept as ``thuScore``
==  ======================  ====================  =========================================

Lines that are blank or contain ``#`` anywhere are comments (as in THUNDER). The file has no
pixel size, box size or half sets: the pixel size must be given, the box comes from the stacks,
and half sets are a seeded random split drawn from the image names, so that the same particles
in any row order get the same halves (recorded in ``ParticleSet.meta``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from numba_recon.errors import InputError, InputFileError, OutputError
from numba_recon.geometry import matrix_to_euler, matrix_to_quaternion, quaternion_to_matrix
from numba_recon.io.atomic import atomic_output
from numba_recon.io.mrc import factorize_paths
from numba_recon.io.names import keyed_half_sets
from numba_recon.io.star import RowProblems, check_stacks, format_image_names, resolve_image_names
from numba_recon.particles import ParticleSet

__all__ = ["THU_COLUMNS", "random_half_sets", "read_thu", "write_thu"]

#: Column names as in THUNDER's ``Database.h`` (``THU_<name>``), in file order.
THU_COLUMNS = (
    "VOLTAGE", "DEFOCUS_U", "DEFOCUS_V", "DEFOCUS_THETA", "CS", "AMPLITUTDE_CONTRAST", "PHASE_SHIFT",
    "PARTICLE_PATH", "MICROGRAPH_PATH", "COORDINATE_X", "COORDINATE_Y", "GROUP_ID", "CLASS_ID",
    "QUATERNION_0", "QUATERNION_1", "QUATERNION_2", "QUATERNION_3", "K1", "K2", "K3",
    "TRANSLATION_X", "TRANSLATION_Y", "STD_TRANSLATION_X", "STD_TRANSLATION_Y",
    "DEFOCUS_FACTOR", "STD_DEFOCUS_FACTOR", "SCORE",
)
_N_COLUMNS = len(THU_COLUMNS)
_STRING_COLUMNS = (7, 8)
_INTEGER_COLUMNS = (11, 12)
_NUMERIC_COLUMNS = tuple(i for i in range(_N_COLUMNS) if i not in _STRING_COLUMNS)
# THUNDER-only columns carried through the particle table (and thus through STAR files)
_EXTRA_LABELS = {17: "thuK1", 18: "thuK2", 19: "thuK3", 22: "thuStdTranslationX", 23: "thuStdTranslationY",
                 25: "thuStdDefocusFactor", 26: "thuScore"}
# written when particles have no micrograph name: the column must hold a token
_MICROGRAPH_PLACEHOLDER = "None"


def random_half_sets(n: int, seed: int) -> np.ndarray:  # kept for callers that have no image names
    """Seeded random gold-standard split: ``(n,)`` int8 of 1 and 2, sizes ``ceil(n/2)`` and ``floor(n/2)``."""
    half = np.full(n, 2, dtype=np.int8)
    perm = np.random.default_rng(seed).permutation(n)
    half[perm[: (n + 1) // 2]] = 1
    return half


def _data_lines(path: Path) -> tuple[list[list[str]], np.ndarray, str]:
    """Token lists of the particle lines, their 1-based line numbers (comments and blanks skipped)
    and the text encoding: UTF-8, or Latin-1 for a file that is not valid UTF-8 (it keeps every byte,
    so stack names with such bytes are found on disk and written back unchanged)."""
    tokens: list[list[str]] = []
    numbers: list[int] = []
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"
    for number, line in enumerate(text.splitlines(), start=1):
        if "#" in line or not line.strip():
            continue
        tokens.append(line.split())
        numbers.append(number)
    return tokens, np.asarray(numbers, dtype=np.int64), encoding


def read_thu(path: str | os.PathLike, *, angpix: float | None, root: str | os.PathLike | None = None, seed: int = 0,
             permissive: bool = False) -> ParticleSet:
    """Read a THUNDER ``.thu`` particle file.

    Parameters
    ----------
    path
        The ``.thu`` file.
    angpix
        Pixel size in Angstrom (required: ``.thu`` files do not store it).
    root
        Folder that relative stack paths are relative to; default: the ``.thu`` file's folder.
    seed
        Seed of the random half-set split.
    permissive
        Skip malformed lines and unusable particles with a ``RuntimeWarning`` instead of raising.

    Returns
    -------
    ParticleSet
        ``table`` holds RELION labels (``rlnAngleRot``... computed from the quaternions) plus the
        THUNDER-only columns ``thuK1..3``, ``thuStdTranslationX/Y``, ``thuStdDefocusFactor``,
        ``thuScore``. ``meta["half_split"]`` records the seeded split.

    Raises
    ------
    InputError
        ``angpix`` not positive.
    InputFileError
        ``angpix`` missing; malformed line (wrong column count, non-numeric value, a value whose conversion
        overflows such as radians to degrees or defocus x factor: the message names the line number), zero
        quaternion, missing or bad stacks.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path, "check the path")
    if path.is_dir():
        raise InputFileError("is a folder, not a .thu file", path, "give the path of a .thu file")
    if angpix is None:
        raise InputFileError(".thu files do not store the pixel size", path,
                             "pass --angpix with the pixel size in Angstrom")
    if not math.isfinite(angpix) or angpix <= 0:
        raise InputError(f"--angpix {angpix}: not a positive pixel size; give the pixel size in Angstrom (e.g. 1.06)")

    lines, line_numbers, encoding = _data_lines(path)
    if not lines:
        raise InputFileError("contains no particle lines", path, "give a .thu file with at least one particle")
    counts = np.fromiter((len(t) for t in lines), dtype=np.int64, count=len(lines))
    wrong = counts != _N_COLUMNS
    if wrong.any() and not permissive:
        i = int(np.flatnonzero(wrong)[0])
        raise InputFileError(f"line {line_numbers[i]} has {counts[i]} columns, expected {_N_COLUMNS}", path,
                             "fix or remove that line (THUNDER writes 27 whitespace-separated values per particle)")
    rows = RowProblems(path, line_numbers, "line", permissive)
    rows.report(wrong, lambda i: f"wrong number of columns ({counts[i]}, expected {_N_COLUMNS})",
                "fix or remove the malformed lines")
    padded = [t if len(t) == _N_COLUMNS else ["0"] * _N_COLUMNS for t in lines]
    text = np.array(padded, dtype=object).reshape(len(padded), _N_COLUMNS)

    numbers = np.empty((len(padded), _N_COLUMNS), dtype=np.float64)
    numbers[:, list(_STRING_COLUMNS)] = np.nan
    for c in _NUMERIC_COLUMNS:
        column = pd.to_numeric(pd.Series(text[:, c], dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        rows.report(~np.isfinite(column),
                    lambda i, c=c: f"column {c} ({THU_COLUMNS[c]}) is not a finite number: {text[i, c]!r}",
                    "fix or remove that line")
        numbers[:, c] = column
    for c in _INTEGER_COLUMNS:
        column = numbers[:, c]
        rows.report(np.isfinite(column) & (column != np.round(column)),
                    lambda i, c=c: f"column {c} ({THU_COLUMNS[c]}) must be an integer: {text[i, c]!r}",
                    "fix or remove that line")
    # the norm of (1e200, 1e200, 0, 0) overflows to inf: such quaternions are scaled down first
    quat = np.nan_to_num(numbers[:, 13:17])
    quat_scale = np.abs(quat).max(axis=1, keepdims=True)
    huge = quat_scale > 1e150
    quat = np.where(huge, quat / np.where(huge, quat_scale, 1.0), quat)
    norm = np.linalg.norm(quat, axis=1) * np.where(huge[:, 0], quat_scale[:, 0], 1.0)
    rows.report(norm < 1e-6, lambda i: "quaternion is zero (no pose)",
                "give poses: .thu files made from STAR files by THUNDER's STAR_2_THU.py carry none")
    voltage_v = numbers[:, 0]
    rows.report(np.isfinite(voltage_v) & (voltage_v <= 0), lambda i: f"voltage {voltage_v[i]:g} V is not positive",
                "give the acceleration voltage in volts (e.g. 300000)")
    q0 = numbers[:, 5]
    rows.report(np.isfinite(q0) & ((q0 < 0) | (q0 >= 1)),
                lambda i: f"amplitude contrast {q0[i]:g} is outside [0, 1)", "give it as a fraction (e.g. 0.1)")

    # finite values whose conversion overflows (1e307 rad in degrees, defocus 1e300 x factor 1e300)
    with np.errstate(over="ignore", invalid="ignore"):
        converted = {
            "defocus_u_angstrom": (numbers[:, 1] * numbers[:, 24], "DEFOCUS_U x DEFOCUS_FACTOR", "A"),
            "defocus_v_angstrom": (numbers[:, 2] * numbers[:, 24], "DEFOCUS_V x DEFOCUS_FACTOR", "A"),
            "defocus_angle_deg": (np.rad2deg(numbers[:, 3]), "DEFOCUS_THETA in degrees", "deg"),
            "phase_shift_deg": (np.rad2deg(numbers[:, 6]), "PHASE_SHIFT in degrees", "deg"),
            "origin_x_angstrom": (-numbers[:, 20] * angpix, "TRANSLATION_X x pixel size", "A"),
            "origin_y_angstrom": (-numbers[:, 21] * angpix, "TRANSLATION_Y x pixel size", "A"),
        }
    for values, what, unit in converted.values():
        rows.report(~np.isfinite(values),
                    lambda i, values=values, what=what, unit=unit: f"{what} is not finite ({values[i]:g} {unit})",
                    "fix or remove that line (THUNDER writes angles in radians and defocus in Angstrom)")

    base_dir = Path(root) if root is not None else path.parent
    if root is not None and not base_dir.is_dir():
        raise InputError(f"--root {root}: folder not found; give the folder the image paths are relative to")
    stack_paths, stack_indices, raw_paths = resolve_image_names(text[:, 7], base_dir, rows, label="particle path",
                                                                encoding=encoding)
    box = check_stacks(stack_paths, stack_indices, raw_paths, rows, root_given=root is not None)
    keep = rows.finish()
    sel = np.flatnonzero(keep)
    n = len(sel)
    num, txt = numbers[sel], text[sel]

    rotations = quaternion_to_matrix(quat[sel]).reshape(-1, 3, 3)  # normalises the quaternions
    shifts_px = -num[:, 20:22]
    ctf = {
        "defocus_u_angstrom": converted["defocus_u_angstrom"][0][sel],
        "defocus_v_angstrom": converted["defocus_v_angstrom"][0][sel],
        "defocus_angle_deg": converted["defocus_angle_deg"][0][sel],
        "voltage_kv": num[:, 0] / 1000.0,
        "cs_mm": num[:, 4] / 1e7,
        "amplitude_contrast": num[:, 5].copy(),
        "phase_shift_deg": converted["phase_shift_deg"][0][sel],
        "bfactor_angstrom2": np.zeros(n),
        "scale": np.ones(n),
    }
    class_number = np.round(num[:, 12]).astype(np.int64) + 1
    half_set = keyed_half_sets(stack_paths[sel], stack_indices[sel], seed)
    angles = matrix_to_euler(rotations).reshape(-1, 3)
    table = pd.DataFrame({
        "rlnImageName": txt[:, 7].astype(str),
        "rlnMicrographName": txt[:, 8].astype(str),
        "rlnCoordinateX": num[:, 9],
        "rlnCoordinateY": num[:, 10],
        "rlnVoltage": ctf["voltage_kv"],
        "rlnDefocusU": ctf["defocus_u_angstrom"],
        "rlnDefocusV": ctf["defocus_v_angstrom"],
        "rlnDefocusAngle": ctf["defocus_angle_deg"],
        "rlnSphericalAberration": ctf["cs_mm"],
        "rlnAmplitudeContrast": ctf["amplitude_contrast"],
        "rlnPhaseShift": ctf["phase_shift_deg"],
        "rlnGroupNumber": np.round(num[:, 11]).astype(np.int64),
        "rlnClassNumber": class_number,
        "rlnAngleRot": angles[:, 0],
        "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": converted["origin_x_angstrom"][0][sel],
        "rlnOriginYAngst": converted["origin_y_angstrom"][0][sel],
        "rlnRandomSubset": half_set.astype(np.int64),
        **{label: num[:, c] for c, label in _EXTRA_LABELS.items()},
    })
    return ParticleSet(
        table=table,
        stack_paths=stack_paths[sel].astype(object),
        stack_indices=stack_indices[sel],
        rotations=rotations,
        shifts_px=shifts_px,
        ctf=ctf,
        pixel_size_angstrom=float(angpix),
        box_size=box,
        half_set=half_set,
        optics_group=np.ones(n, dtype=np.int64),
        optics=None,
        class_number=class_number,
        ctf_premultiplied=np.zeros(n, dtype=bool),
        source=path,
        meta={
            "format": "thu",
            "text_encoding": encoding,
            "pixel_size_source": "--angpix",
            "n_stacks": int(len(factorize_paths(stack_paths[sel])[1])),
            "root": None if root is None else os.path.abspath(root),
            "half_split": {"method": "seeded hash of the image names", "seed": int(seed)},
            "defocus_factor_applied": True,
        },
    )


def _header_lines() -> list[str]:
    """THUNDER's description lines: ``#<col>:<NAME>\\t<TYPE>\\t<printf format>``."""
    out = []
    for i, name in enumerate(THU_COLUMNS):
        if i in _STRING_COLUMNS:
            kind, fmt = "STRING", "s"
        elif i in _INTEGER_COLUMNS:
            kind, fmt = "INT", "6d"
        else:
            kind, fmt = "FLOAT", "18.9f"
        out.append(f"#{i}:{name}\t{kind}\t{fmt}")
    return out


def write_thu(particles: ParticleSet, path: str | os.PathLike) -> None:
    """Write particles as a THUNDER ``.thu`` file, atomically.

    The inverse of :func:`read_thu`: voltage in V, Cs in Angstrom, angles in radians, quaternion
    ``quat(A^T)`` (``w >= 0``), translation ``= -origin``, class ``= class_number - 1``, defocus
    factor 1 with defocus U and V already multiplied. THUNDER-only columns come from the table
    (``thuK1``... as read from a ``.thu`` file) or are 0 as THUNDER's STAR_2_THU.py writes them;
    the group is ``rlnGroupNumber`` or 1. Image paths are relative to the output file's folder.
    Numbers are written as the shortest text that reads back to the same value (space-separated,
    as THUNDER's reader tokenises on spaces), after THUNDER's ``#0:VOLTAGE ...`` header.
    """
    n = len(particles)
    path = Path(path)
    table = particles.table.reset_index(drop=True)
    if len(table) != n:
        raise ValueError(f"particles.table has {len(table)} rows for {n} particles")

    def table_column(label: str, default: float) -> np.ndarray:
        if label in table.columns:
            values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            return np.where(np.isfinite(values), values, default)
        return np.full(n, default, dtype=np.float64)

    ctf = particles.ctf
    columns: list[list[str]] = [[] for _ in range(_N_COLUMNS)]
    numeric: dict[int, np.ndarray] = {
        0: ctf["voltage_kv"] * 1000.0,
        1: ctf["defocus_u_angstrom"],
        2: ctf["defocus_v_angstrom"],
        3: np.deg2rad(ctf["defocus_angle_deg"]),
        4: ctf["cs_mm"] * 1e7,
        5: ctf["amplitude_contrast"],
        6: np.deg2rad(ctf["phase_shift_deg"]),
        9: table_column("rlnCoordinateX", 0.0),
        10: table_column("rlnCoordinateY", 0.0),
        24: np.ones(n),
    }
    quat = matrix_to_quaternion(np.asarray(particles.rotations, dtype=np.float64).reshape(-1, 3, 3)).reshape(-1, 4)
    for k in range(4):
        numeric[13 + k] = quat[:, k]
    shifts = np.asarray(particles.shifts_px, dtype=np.float64).reshape(-1, 2)
    numeric[20] = -shifts[:, 0] + 0.0  # + 0.0 turns -0.0 into 0.0
    numeric[21] = -shifts[:, 1] + 0.0
    for c, label in _EXTRA_LABELS.items():
        numeric[c] = table_column(label, 0.0)
    for c, values in numeric.items():
        columns[c] = [repr(float(v)) for v in values.tolist()]
    group = np.round(table_column("rlnGroupNumber", 1.0)).astype(np.int64)
    classes = (np.asarray(particles.class_number, dtype=np.int64) - 1 if particles.class_number is not None
               else np.zeros(n, dtype=np.int64))
    columns[11] = [str(v) for v in group.tolist()]
    columns[12] = [str(v) for v in classes.tolist()]
    columns[7] = format_image_names(particles.stack_paths, particles.stack_indices, path.parent).tolist()
    if "rlnMicrographName" in table.columns:
        mics = table["rlnMicrographName"].astype(str).str.replace(r"\s+", "_", regex=True).tolist()
    else:
        mics = [_MICROGRAPH_PLACEHOLDER] * n
    columns[8] = [m if m else _MICROGRAPH_PLACEHOLDER for m in mics]
    for c in _STRING_COLUMNS:
        bad = [v for v in columns[c] if "#" in v]
        if bad:  # THUNDER skips any line containing '#' as a comment
            raise OutputError(f"cannot write {bad[0]!r} to a .thu file: THUNDER reads lines containing '#' "
                              "as comments", path, "rename the files so their paths contain no '#'")

    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:  # bytes as read
            f.write("\n".join(_header_lines()) + "\n")
            for row in zip(*columns):
                f.write(" ".join(row) + "\n")
