"""RELION STAR particle files: read RELION 3.0, 3.1, 4 and 5; write RELION 3.1.

Reading is strict: ``starfile`` parses the text, then every column numba-recon uses is validated
(``starfile`` silently turns a bad token into a string column and fills missing fields with NaN),
every ``index@stack`` is checked against the stack headers, and each problem raises
:class:`~numba_recon.errors.InputFileError` naming the file, the problem (with the first bad row)
and the fix. ``permissive=True`` instead drops the particles that cannot be used (non-numeric or
non-finite values, missing stacks, out-of-range indices, unknown optics groups) with one
``RuntimeWarning``.

Conventions (``docs/file-formats.md``): optics values are merged into each particle, particle
values overriding optics values of the same label (RELION ``CTF::readByGroup``); origins are
RELION's (``rlnOriginXAngst / pixel size`` or ``rlnOriginX`` in pixels), the shift that centres the
particle; ``index@stack`` is 1-based; stack paths are relative to the STAR file's folder unless a
``root`` folder is given.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from pandas.api import types as pdt

from numba_recon.errors import InputError, InputFileError
from numba_recon.geometry import euler_to_matrix, matrix_to_euler
from numba_recon.io.atomic import atomic_output
from numba_recon.io.star_text import loop_block, quote
from numba_recon.io.mrc import factorize_paths, non_regular_kind, stack_shape
from numba_recon.particles import CTF_KEYS, ParticleSet
from numba_recon.provenance import comment_lines

__all__ = [
    "CTF_LABELS",
    "OPTICS_LABELS",
    "REQUIRED_LABELS",
    "SCORE_COLUMNS",
    "STAR_VERSION_WRITTEN",
    "image_name_root",
    "read_particle_scores",
    "read_star",
    "scores_path",
    "without_score_columns",
    "write_particle_scores",
    "write_star",
]

log = logging.getLogger(__name__)

#: Columns a particle file must have (after merging the optics table).
REQUIRED_LABELS = (
    "rlnImageName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnDefocusU",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)

#: ParticleSet.ctf key -> (RELION label, default or None when required). Defaults: ``src/ctf.cpp``.
CTF_LABELS: dict[str, tuple[str, float | None]] = {
    "defocus_u_angstrom": ("rlnDefocusU", None),
    "defocus_v_angstrom": ("rlnDefocusV", None),  # defaults to DefocusU
    "defocus_angle_deg": ("rlnDefocusAngle", 0.0),
    "voltage_kv": ("rlnVoltage", None),
    "cs_mm": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
    "phase_shift_deg": ("rlnPhaseShift", 0.0),
    "bfactor_angstrom2": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
}
assert tuple(CTF_LABELS) == CTF_KEYS

#: Labels that belong in ``data_optics`` in RELION >= 3.1 files.
OPTICS_LABELS = frozenset({
    "rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied", "rlnCtfDataArePhaseFlipped", "rlnMagnification",
    "rlnDetectorPixelSize", "rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize",
    "rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike", "rlnMtfFileName",
    "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11",
})

# Numeric labels numba-recon reads; each is checked for non-numeric tokens and non-finite values.
_NUMERIC_LABELS = (
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
    "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor",
    "rlnCtfScalefactor", "rlnOpticsGroup", "rlnRandomSubset", "rlnClassNumber", "rlnImagePixelSize",
    "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize", "rlnCtfDataAreCtfPremultiplied",
)

# RELION reads these as integers: written without a decimal point.
_INTEGER_LABELS = frozenset({
    "rlnOpticsGroup", "rlnImageSize", "rlnImageDimensionality", "rlnRandomSubset", "rlnClassNumber",
    "rlnGroupNumber", "rlnCtfDataAreCtfPremultiplied", "rlnCtfDataArePhaseFlipped",
    "rlnNrOfSignificantSamples", "rlnNrOfFrames", "rlnHelicalTubeID",
})

#: Version line written by :func:`write_star` (RELION 3.1 / 4 format).
STAR_VERSION_WRITTEN = 30001

# RELION's placeholder for "no psi" in picked-particle files.
_PSI_PLACEHOLDER = -999.0
# Optics values that make RELION 3.0 particles one optics group (star_converter.cpp).
_RELION30_OPTICS_KEYS = ("rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY", "rlnSphericalAberration",
                         "rlnVoltage", "rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize")
_VERSION_RE = re.compile(r"^#\s*version\s+(\d+)", re.MULTILINE)
# An MRC header counts images in a signed 32-bit integer: no stack holds more.
_MAX_STACK_IMAGES = 2**31 - 1


# --------------------------------------------------------------------------------------------
# row-level problem collection (shared with io/thu.py)
# --------------------------------------------------------------------------------------------

class RowProblems:
    """Per-row problems of a particle file: raise on the first (strict) or drop the rows (permissive).

    Parameters
    ----------
    path
        The particle file, named in every message.
    row_numbers
        ``(n,)`` what to call each row in messages (1-based table rows, or file line numbers).
    row_word
        ``"particle row"`` or ``"line"``.
    permissive
        Drop bad rows with one ``RuntimeWarning`` (from :meth:`finish`) instead of raising.
    """

    def __init__(self, path: str | os.PathLike, row_numbers: np.ndarray, row_word: str, permissive: bool):
        self.path = os.fspath(path)
        self.row_numbers = np.asarray(row_numbers)
        self.row_word = row_word
        self.permissive = permissive
        self.bad = np.zeros(len(self.row_numbers), dtype=bool)
        # rows not wanted (e.g. another class): skipped by the checks, not reported
        self.unwanted = np.zeros(len(self.row_numbers), dtype=bool)
        self.notes: list[str] = []

    @property
    def live(self) -> np.ndarray:
        """Rows still in play: neither bad nor unwanted."""
        return ~(self.bad | self.unwanted)

    def where(self, i: int) -> str:
        return f"{self.row_word} {self.row_numbers[i]}"

    def report(self, mask: np.ndarray, problem: Callable[[int], str], fix: str) -> None:
        """Rows where ``mask`` is True have a problem; ``problem(i)`` describes row ``i`` (0-based)."""
        mask = np.asarray(mask, dtype=bool) & self.live
        if not mask.any():
            return
        rows = np.flatnonzero(mask)
        text = f"{problem(int(rows[0]))} ({self.where(int(rows[0]))}"
        text += f", {len(rows)} rows in all)" if len(rows) > 1 else ")"
        if not self.permissive:
            raise InputFileError(text, self.path, fix)
        self.bad |= mask
        self.notes.append(text)

    def finish(self) -> np.ndarray:
        """Warn about dropped rows; return the boolean mask of rows to keep."""
        keep = self.live
        if not keep.any():
            raise InputFileError("no usable particles left after dropping bad rows: " + "; ".join(self.notes[:3]),
                                 self.path, "fix the file (run without permissive mode to see the first problem)")
        if self.bad.any():
            msg = (f"{self.path}: skipped {int(self.bad.sum())} of {len(keep)} particles: "
                   + "; ".join(self.notes[:5]) + ("; ..." if len(self.notes) > 5 else ""))
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
        return keep


# --------------------------------------------------------------------------------------------
# image names and stacks (shared with io/thu.py)
# --------------------------------------------------------------------------------------------

def resolve_image_names(names: Sequence[str], base_dir: str | os.PathLike, rows: RowProblems, *,
                        label: str = "rlnImageName", encoding: str = "utf-8"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``index@stack`` names and resolve the stack paths.

    Parameters
    ----------
    names
        ``(n,)`` image names: ``index@path`` with a 1-based index, or a bare path (a single image,
        index 1).
    base_dir
        Folder that relative stack paths are relative to.
    rows
        Collects malformed names.
    encoding
        How the names were decoded from the file: ``"latin-1"`` names are turned back into the
        file's bytes to find the stacks on disk (``os.fsdecode``).

    Returns
    -------
    stack_paths
        ``(n,)`` object array of absolute, normalised paths (str); ``""`` for malformed rows.
    indices
        ``(n,)`` int64, 0-based image index; -1 for malformed rows.
    raw_paths
        ``(n,)`` object array of the stack paths as written in the file.
    """
    s = pd.Series(np.asarray(names, dtype=object), dtype=object).astype(str)
    has_at = s.str.contains("@", regex=False).to_numpy()
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    index_text = np.where(has_at, parts[0].to_numpy(dtype=object), "1")
    raw_paths = np.where(has_at, parts[1].to_numpy(dtype=object), s.to_numpy(dtype=object)).astype(object)
    number = pd.to_numeric(pd.Series(index_text, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    malformed = ~np.isfinite(number) | (number != np.floor(number)) | (number < 1)
    malformed |= pd.Series(raw_paths, dtype=object).astype(str).str.strip().eq("").to_numpy()
    rows.report(malformed, lambda i: f"{label} {s.iloc[i]!r} is not index@stack with an index >= 1",
                "write image names as 000001@path/stack.mrcs (1-based index)")
    # refused before the int64 cast below, which would wrap 1e20 around to a negative index
    too_big = ~malformed & (number > _MAX_STACK_IMAGES)
    rows.report(too_big,
                lambda i: (f"image index {str(index_text[i]).strip()} in {label} {s.iloc[i]!r} is not a valid "
                           f"image index (an MRC stack holds at most {_MAX_STACK_IMAGES} images)"),
                "check the index@stack entries (indices are 1-based)")
    malformed |= too_big
    indices = np.where(malformed, 0, number).astype(np.int64) - 1
    base = os.path.abspath(os.fspath(base_dir))
    inverse, unique_raw = factorize_paths(raw_paths)
    if encoding != "utf-8":  # the name's bytes as the file system's str (undecodable bytes as surrogates)
        unique_raw = [os.fsdecode(str(p).encode(encoding)) for p in unique_raw]
    resolved = np.array([os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in unique_raw],
                        dtype=object)
    stack_paths = resolved[inverse] if len(resolved) else np.empty(0, dtype=object)
    stack_paths = np.where(malformed, "", stack_paths).astype(object)
    return stack_paths, np.where(malformed, -1, indices).astype(np.int64), raw_paths


def check_stacks(stack_paths: np.ndarray, indices: np.ndarray, raw_paths: np.ndarray, rows: RowProblems, *,
                 root_given: bool, image_size: np.ndarray | None = None, size_label: str = "rlnImageSize") -> int:
    """Check every referenced stack from its header alone; return the common box size.

    Each stack header is read once. Missing stacks, corrupt or truncated stacks, indices beyond a
    stack, non-square images and (when ``image_size`` is given) a stack box that differs from the
    declared image size are reported through ``rows``; stacks of different box sizes raise.

    Parameters
    ----------
    stack_paths, indices, raw_paths
        Output of :func:`resolve_image_names`.
    root_given
        Whether the user gave a root folder (changes the suggested fix for missing stacks).
    image_size
        ``(n,)`` declared box size per row (``rlnImageSize``), or None.
    """
    live = rows.live
    if not live.any():
        return 0
    inverse, unique_paths = factorize_paths(stack_paths)
    n_unique = len(unique_paths)
    exists = np.zeros(n_unique, dtype=bool)
    special: dict[int, str] = {}  # stack -> what it is when it exists but is not a regular file
    broken = np.zeros(n_unique, dtype=bool)
    n_images = np.zeros(n_unique, dtype=np.int64)
    ny = np.zeros(n_unique, dtype=np.int64)
    nx = np.zeros(n_unique, dtype=np.int64)
    errors: dict[int, InputFileError] = {}
    used = np.zeros(n_unique, dtype=bool)
    used[inverse[live]] = True
    for k in np.flatnonzero(used):
        path = str(unique_paths[k])
        if not os.path.isfile(path):
            kind = non_regular_kind(path)  # never opened: a named pipe would block
            if kind is not None:
                special[int(k)] = kind
            continue
        exists[k] = True
        try:
            n_images[k], ny[k], nx[k] = stack_shape(path)
        except InputFileError as err:
            if not rows.permissive:
                raise
            broken[k] = True
            errors[k] = err

    is_special = np.zeros(n_unique, dtype=bool)
    is_special[list(special)] = True
    rows.report(is_special[inverse],
                lambda i: f"stack file {raw_paths[i]} at {stack_paths[i]} is a {special[int(inverse[i])]}, not a "
                          "regular file", "point the image names at MRC stack files")
    missing_row = used[inverse] & ~exists[inverse] & ~is_special[inverse]
    if missing_row.any():
        first = int(np.flatnonzero(missing_row & live)[0])
        raw = str(raw_paths[first])
        if root_given:
            fix = "check --root: image paths are resolved relative to it"
        elif not os.path.isabs(raw) and os.path.exists(raw):
            fix = "the path exists relative to the current folder: pass --root ."
        else:
            fix = ("pass --root with the folder the image paths are relative to "
                   "(usually the RELION project folder)")
        rows.report(missing_row, lambda i: f"stack file {raw_paths[i]} not found at {stack_paths[i]}", fix)
    rows.report(broken[inverse], lambda i: str(errors[int(inverse[i])]), "re-copy or re-extract the stack")

    ok = exists & ~broken
    nonsquare = ok & (ny != nx)
    rows.report(nonsquare[inverse],
                lambda i: f"stack {stack_paths[i]} has non-square images ({ny[inverse[i]]} x {nx[inverse[i]]} pixels)",
                "re-extract the particles with a square box")
    beyond = ok[inverse] & (indices >= n_images[inverse])
    rows.report(beyond,
                lambda i: (f"image index {indices[i] + 1} is beyond the end of stack {stack_paths[i]}, "
                           f"which holds {n_images[inverse[i]]} images"),
                "check the index@stack entries (indices are 1-based) and that the stacks are complete")

    live = rows.live
    if not live.any():
        return 0
    boxes = nx[inverse[live]]
    distinct = np.unique(boxes)
    if len(distinct) > 1:
        examples = []
        for b in distinct[:3]:
            k = inverse[live][np.flatnonzero(boxes == b)[0]]
            examples.append(f"{b} px ({unique_paths[k]})")
        raise InputFileError("stacks have different box sizes: " + ", ".join(examples), rows.path,
                             "use particles extracted with one box size")
    box = int(distinct[0])
    if image_size is not None:
        mismatch = live & (np.asarray(image_size) != box)
        if mismatch.any():
            i = int(np.flatnonzero(mismatch)[0])
            text = (f"stack box {box} px differs from {size_label} {int(image_size[i])} "
                    f"(stack {stack_paths[i]}, {rows.where(i)})")
            fix = f"correct {size_label} or point the image names at the right stacks"
            if not rows.permissive:
                raise InputFileError(text, rows.path, fix)
            msg = f"{rows.path}: {text}; using the stack box {box} px"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
    return box


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _star_version(path: Path) -> int:
    """The ``# version NNNNN`` of the file; RELION treats a file without one as 30000 (3.0)."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536).decode("utf-8", errors="replace")
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None
    m = _VERSION_RE.search(head)
    return int(m.group(1)) if m else 30000


def _check_block_names(path: Path) -> None:
    """Refuse data blocks that ``starfile`` would silently lose or misname.

    ``starfile`` keeps only the last block of each name, so ``cat a.star b.star`` would drop the
    particles of the first file; and a ``data_`` line with no table before the next ``data_`` line
    gives its name to the next block's table. Blocks are found as ``starfile`` finds them: a line
    starting with ``data_`` (after blanks) names a block, whose table starts at the next ``loop_``
    or ``_label`` line.

    Raises
    ------
    InputFileError
        A block name appears twice with a table, or an empty block precedes a block of another name.
    """
    seen: set[bytes] = set()
    name: bytes | None = None
    pending = False  # a data_ line whose table has not started yet

    def text(b: bytes) -> str:
        return b.decode("utf-8", errors="replace")

    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f):
                line = raw.strip()
                if number == 0 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                    line = line[3:].strip()
                if line.startswith(b"data_"):
                    if pending and line[5:] != name:
                        raise InputFileError(f"data block data_{text(name)} is empty and followed by "
                                             f"data_{text(line[5:])}", path,
                                             f"remove the empty data_{text(name)} line")
                    name, pending = line[5:], True
                elif pending and (line.startswith(b"_") or line.startswith(b"loop_")):
                    pending = False
                    if name in seen:
                        raise InputFileError(f"data block data_{text(name)} appears more than once (two STAR "
                                             "files joined?); only the last one would be read", path,
                                             "combine particle files with relion_star_handler --combine, "
                                             "or keep one block of each name")
                    seen.add(name)
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None


def _is_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None
    return True


def _read_latin1(path: Path) -> dict:
    """``starfile.read`` of a file that is not valid UTF-8 (e.g. one Latin-1 byte in a name).

    ``starfile`` reads text as UTF-8 and, on one undecodable byte, silently returns no blocks.
    The file is decoded as Latin-1 instead (every byte one character: nothing is refused and the
    bytes can be recovered exactly, ``text.encode("latin-1")``) and parsed from a UTF-8 copy in a
    temporary folder.
    """
    import tempfile

    import starfile

    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark: dropped, as starfile's own reading does
        raw = raw[3:]
    with tempfile.TemporaryDirectory(prefix="numba-recon-star-") as folder:
        copy = Path(folder) / path.name
        with open(copy, "w", encoding="utf-8", newline="") as f:  # newline="": line ends kept as they are
            f.write(raw.decode("latin-1"))
        del raw
        return starfile.read(copy, always_dict=True)


def _parse_blocks(path: Path) -> tuple[dict, str]:
    """The data blocks of the file (name -> DataFrame for a loop, dict for a key-value block) and
    the text encoding they were decoded with.

    Text is UTF-8 (``"utf-8"``); a file that is not valid UTF-8 (RELION accepts any bytes in names)
    is decoded as Latin-1 (``"latin-1"``), which keeps every byte: :func:`write_star` writes such
    text back as the same bytes, and image paths are mapped to the file names on disk.
    """
    import starfile

    _check_block_names(path)
    encoding = "utf-8" if _is_utf8(path) else "latin-1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True) if encoding == "utf-8" else _read_latin1(path)
    except InputError:
        raise
    except Exception as err:  # starfile/pandas raise many types on malformed text
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputFileError(f"cannot parse the STAR file ({type(err).__name__}: {first})", path,
                             "check that every row of each loop has one value per column") from None
    return blocks, encoding


def _pick_tables(blocks: dict, path: Path) -> tuple[pd.DataFrame | None, pd.DataFrame, str]:
    """(optics, particles, particle block name)."""
    if not blocks:
        raise InputFileError("contains no data blocks (empty or not a STAR file)", path,
                             "give a RELION particle STAR file")

    def as_frame(block: object) -> pd.DataFrame:
        if isinstance(block, pd.DataFrame):
            return block
        if isinstance(block, dict):  # a key-value block: one row
            return pd.DataFrame({k: [v] for k, v in block.items()})
        raise InputFileError("has an unreadable data block", path, "give a RELION particle STAR file")

    optics = as_frame(blocks["optics"]) if "optics" in blocks else None
    if "particles" in blocks:
        return optics, as_frame(blocks["particles"]), "particles"
    if optics is not None:
        raise InputFileError("has data_optics but no data_particles block", path,
                             "give a particle STAR file (e.g. run_data.star)")
    candidates = [(name, b) for name, b in blocks.items()
                  if isinstance(b, pd.DataFrame) and "rlnImageName" in b.columns]
    if len(candidates) == 1:
        return None, candidates[0][1], candidates[0][0]
    if not candidates:
        frames = [(name, b) for name, b in blocks.items() if isinstance(b, pd.DataFrame)]
        if len(frames) == 1:  # a RELION 3.0 table that lacks rlnImageName: report the missing column later
            return None, frames[0][1], frames[0][0]
        raise InputFileError("has no particle table (a loop with rlnImageName)", path,
                             "give a particle STAR file such as run_data.star, not a model or optimiser file")
    names = ", ".join(f"data_{name}" for name, _ in candidates)
    raise InputFileError(f"has several particle tables ({names})", path,
                         "keep one particle table per file (RELION 3.1+ names it data_particles)")


def _coerce_numeric(table: pd.DataFrame, where: str, path: Path, rows: RowProblems | None) -> pd.DataFrame:
    """Make the used numeric columns float/int, reporting the first non-numeric token."""
    table = table.copy()
    for label in _NUMERIC_LABELS:
        if label not in table.columns:
            continue
        col = table[label]
        if pdt.is_bool_dtype(col):
            table[label] = col.astype(np.int64)
            continue
        if pdt.is_numeric_dtype(col):
            continue
        numeric = pd.to_numeric(col, errors="coerce")
        bad = (numeric.isna() & col.notna()).to_numpy()
        if not bad.any():  # e.g. an object column holding numbers
            table[label] = numeric
            continue
        values = col.to_numpy(dtype=object)
        fix = f"replace the non-numeric values of {label} with numbers"
        if rows is None:
            i = int(np.flatnonzero(bad)[0]) if bad.any() else 0
            raise InputFileError(f"column {label} of {where} is not numeric: row {i + 1} has {values[i]!r}",
                                 path, fix)
        rows.report(bad, lambda i: f"column {label} is not numeric: value {values[i]!r}", fix)
        table[label] = numeric
    return table


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame, path: Path, rows: RowProblems) -> pd.DataFrame:
    """Particles with every optics column added (particle values win for labels in both tables)."""
    if "rlnOpticsGroup" not in optics.columns:
        raise InputFileError("data_optics lacks rlnOpticsGroup", path, "add the optics group number column")
    if optics.empty:
        raise InputFileError("data_optics has no rows", path, "add one row per optics group")
    groups = optics["rlnOpticsGroup"].to_numpy()
    if len(np.unique(groups)) != len(groups):
        raise InputFileError("data_optics lists an optics group twice", path, "give each optics group one row")
    for label in _NUMERIC_LABELS:
        if label in optics.columns:
            values = optics[label].to_numpy(dtype=np.float64)
            if not np.isfinite(values).all():
                i = int(np.flatnonzero(~np.isfinite(values))[0])
                raise InputFileError(f"data_optics column {label} is missing or not finite in row {i + 1}",
                                     path, f"give {label} a value for every optics group")
    if "rlnOpticsGroup" not in particles.columns:
        return particles  # reported with the other missing columns
    merged = particles.copy()
    member = merged["rlnOpticsGroup"].isin(optics["rlnOpticsGroup"]).to_numpy()
    values = merged["rlnOpticsGroup"].to_numpy()
    known = ", ".join(str(g) for g in groups[:10])
    rows.report(~member, lambda i: f"optics group {values[i]} is not in data_optics (which has {known})",
                "add the optics group to data_optics or correct rlnOpticsGroup")
    by_group = optics.set_index("rlnOpticsGroup")
    for label in optics.columns:
        if label == "rlnOpticsGroup" or label in merged.columns:
            continue
        merged[label] = merged["rlnOpticsGroup"].map(by_group[label]).to_numpy()
    return merged


def _numbers(table: pd.DataFrame, label: str, rows: RowProblems) -> np.ndarray:
    """Column ``label`` as float64, non-finite values reported."""
    values = table[label].to_numpy(dtype=np.float64, na_value=np.nan)
    rows.report(~np.isfinite(values), lambda i: f"{label} is missing or not finite ({values[i]})",
                f"give every particle a finite {label}")
    return values


# integer labels (optics group, half set, class, box) beyond RELION's 32-bit int are refused
_INT_LIMIT = 2**31 - 1


def _integers(table: pd.DataFrame, label: str, rows: RowProblems) -> np.ndarray:
    """Column ``label`` as int64; non-integers and values beyond 32-bit integers reported.

    Reported rows come back as 0 (never as the wrapped-around result of an overflowing cast).
    """
    values = _numbers(table, label, rows)
    rows.report(np.isfinite(values) & (values != np.round(values)),
                lambda i: f"{label} must be an integer (found {float(values[i])})", f"write {label} as whole numbers")
    rows.report(np.isfinite(values) & (np.abs(values) > _INT_LIMIT),
                lambda i: f"{label} {float(values[i])} is out of range (beyond +-{_INT_LIMIT})",
                f"correct {label}")
    ok = np.isfinite(values) & (np.abs(values) <= _INT_LIMIT)
    return np.where(ok, np.round(np.where(ok, values, 0.0)), 0).astype(np.int64)


def read_star(path: str | os.PathLike, *, angpix: float | None = None, root: str | os.PathLike | None = None,
              class_number: int | None = None, permissive: bool = False) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 single table, or 3.1 / 4 / 5 with ``data_optics``).

    Parameters
    ----------
    path
        The STAR file.
    angpix
        Pixel size in Angstrom. Overrides the file's ``rlnImagePixelSize`` (or
        ``10000 * rlnDetectorPixelSize / rlnMagnification``); required when the file has neither.
        ``rlnOriginXAngst`` is still converted with the file's own pixel size when it has one.
    root
        Folder that relative stack paths of ``rlnImageName`` are relative to; default: the STAR
        file's folder.
    class_number
        Keep only particles with this ``rlnClassNumber``.
    permissive
        Drop unusable particles with a ``RuntimeWarning`` instead of raising.

    Returns
    -------
    ParticleSet
        ``meta`` holds ``format`` ("star"), ``star_version``, ``pixel_size_source``, ``n_stacks``,
        ``root`` and ``text_encoding`` (``"utf-8"``, or ``"latin-1"`` for a file that is not valid
        UTF-8: its text values are then the Latin-1 reading of the file's bytes).

    Raises
    ------
    InputFileError
        Any problem with the file or the stacks it references; the message names the file, the
        problem (with the first offending row) and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path, "check the path")
    if path.is_dir():
        raise InputFileError("is a folder, not a STAR file", path, "give the path of a .star file")
    kind = non_regular_kind(path)
    if kind is not None:  # a named pipe would block the reads below; a device may never end
        raise InputFileError(f"is a {kind}, not a regular file", path, "give the path of a .star file")
    if angpix is not None and (not math.isfinite(angpix) or angpix <= 0):
        raise InputError(f"--angpix {angpix}: not a positive pixel size; give the pixel size in Angstrom (e.g. 1.06)")
    version = _star_version(path)
    blocks, encoding = _parse_blocks(path)
    optics, particles, block = _pick_tables(blocks, path)
    where = f"data_{block}"
    for frame, name in ((optics, "data_optics"), (particles, where)):
        if frame is not None and frame.columns.duplicated().any():
            label = str(frame.columns[frame.columns.duplicated()][0])
            raise InputFileError(f"column _{label} appears more than once in {name}", path,
                                 f"remove the repeated _{label} label and its values from {name}")
    n = len(particles)
    if n == 0:
        raise InputFileError(f"particle table {where} is empty", path, "give a STAR file with at least one particle")
    rows = RowProblems(path, np.arange(1, n + 1), "particle row", permissive)
    if optics is not None:
        optics = _coerce_numeric(optics.reset_index(drop=True), "data_optics", path, None)
    particles = _coerce_numeric(particles.reset_index(drop=True), where, path, rows)
    # starfile fills the missing fields of a short row with NaN: name them
    used = [c for c in particles.columns if c in _NUMERIC_LABELS or c == "rlnImageName"]
    absent = particles[used].isna().to_numpy()
    rows.report(absent.any(axis=1),
                lambda i: f"missing value(s) for {', '.join(c for c, a in zip(used, absent[i]) if a)}",
                "give every particle one value per column")
    table = _merge_optics(particles, optics, path, rows) if optics is not None else particles

    required = list(REQUIRED_LABELS) + (["rlnOpticsGroup"] if optics is not None else [])
    missing = [label for label in required if label not in table.columns]
    if missing:
        optics_only = {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"} & set(missing)
        hint = ("RELION 3.1+ files keep rlnVoltage, rlnSphericalAberration and rlnAmplitudeContrast in data_optics; "
                if optics is not None and optics_only else "")
        raise InputFileError(f"missing required column(s) {', '.join(missing)} in {where}", path,
                             f"{hint}add the missing columns (numba-recon needs poses and CTF parameters)")

    # poses
    rot = _numbers(table, "rlnAngleRot", rows)
    tilt = _numbers(table, "rlnAngleTilt", rows)
    psi = _numbers(table, "rlnAnglePsi", rows)
    psi = np.where(psi == _PSI_PLACEHOLDER, 0.0, psi)

    # pixel size: rlnImagePixelSize, else detector pixel size / magnification, else --angpix
    file_px = None
    px_source = "--angpix"
    if "rlnImagePixelSize" in table.columns:
        file_px, px_source = _numbers(table, "rlnImagePixelSize", rows), "rlnImagePixelSize"
    elif "rlnDetectorPixelSize" in table.columns and "rlnMagnification" in table.columns:
        det = _numbers(table, "rlnDetectorPixelSize", rows)
        mag = _numbers(table, "rlnMagnification", rows)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # reported below
            file_px = 10000.0 * det / mag
        px_source = "rlnDetectorPixelSize/rlnMagnification"
    if file_px is not None:
        # the derived size can be 0 or infinite from finite inputs (1e308 / 1e-3)
        rows.report(~(np.isfinite(file_px) & (file_px > 0)),
                    lambda i: (f"pixel size from {px_source} is not "
                               f"{'positive' if np.isfinite(file_px[i]) else 'finite'} ({file_px[i]:g} A)"),
                    "correct the pixel size in the file or pass --angpix")
    elif angpix is None:
        raise InputFileError("has no pixel size (no rlnImagePixelSize, nor rlnDetectorPixelSize and "
                             "rlnMagnification)", path, "pass --angpix with the pixel size in Angstrom")

    # origins (RELION's sign: the shift that centres the particle)
    shifts_px = np.zeros((n, 2), dtype=np.float64)
    if "rlnOriginXAngst" in table.columns or "rlnOriginYAngst" in table.columns:
        if not {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns):
            raise InputFileError("has only one of rlnOriginXAngst and rlnOriginYAngst", path,
                                 "give both origin columns")
        origin_px = file_px if file_px is not None else np.full(n, float(angpix))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # reported below
            shifts_px[:, 0] = _numbers(table, "rlnOriginXAngst", rows) / origin_px
            shifts_px[:, 1] = _numbers(table, "rlnOriginYAngst", rows) / origin_px
    elif "rlnOriginX" in table.columns or "rlnOriginY" in table.columns:
        if not {"rlnOriginX", "rlnOriginY"} <= set(table.columns):
            raise InputFileError("has only one of rlnOriginX and rlnOriginY", path, "give both origin columns")
        shifts_px[:, 0] = _numbers(table, "rlnOriginX", rows)
        shifts_px[:, 1] = _numbers(table, "rlnOriginY", rows)
    # rlnOriginXAngst / a tiny pixel size overflows to infinity
    rows.report(~np.isfinite(shifts_px).all(axis=1),
                lambda i: (f"origin ({shifts_px[i, 0]:g}, {shifts_px[i, 1]:g}) px is not finite "
                           "(origin in Angstrom divided by the pixel size)"),
                "correct the origins or the pixel size in the file")

    # CTF: particle value, else optics value (both merged into `table`), else RELION's default
    ctf: dict[str, np.ndarray] = {}
    for key, (label, default) in CTF_LABELS.items():
        if label in table.columns:
            ctf[key] = _numbers(table, label, rows)
        elif key == "defocus_v_angstrom":
            ctf[key] = ctf["defocus_u_angstrom"].copy()
        else:
            ctf[key] = np.full(n, float(default), dtype=np.float64)
    kv = ctf["voltage_kv"]
    rows.report(np.isfinite(kv) & ((kv <= 0) | (kv > 3000)),
                lambda i: f"rlnVoltage {kv[i]:g} is not an acceleration voltage in kV",
                "give rlnVoltage in kV (e.g. 300)")
    q0 = ctf["amplitude_contrast"]
    rows.report(np.isfinite(q0) & ((q0 < 0) | (q0 >= 1)),
                lambda i: f"rlnAmplitudeContrast {q0[i]:g} is outside [0, 1)",
                "give the amplitude contrast as a fraction (e.g. 0.1)")

    # optics groups: from the file, or RELION 3.0's grouping by identical optics values
    if "rlnOpticsGroup" in table.columns:
        optics_group = _integers(table, "rlnOpticsGroup", rows)
    else:
        keys = [k for k in _RELION30_OPTICS_KEYS if k in table.columns]
        optics_group = (table.groupby(keys, sort=False, dropna=False).ngroup().to_numpy().astype(np.int64) + 1
                        if keys else np.ones(n, dtype=np.int64))

    half_set = np.zeros(n, dtype=np.int8)
    if "rlnRandomSubset" in table.columns:
        subset = _integers(table, "rlnRandomSubset", rows)
        rows.report(~np.isin(subset, (0, 1, 2)), lambda i: f"rlnRandomSubset is {subset[i]}, not 1 or 2",
                    "set rlnRandomSubset to 1 or 2 (or remove the column for a seeded random split)")
        half_set = np.where(np.isin(subset, (0, 1, 2)), subset, 0).astype(np.int8)
    classes = _integers(table, "rlnClassNumber", rows) if "rlnClassNumber" in table.columns else None
    premultiplied = np.zeros(n, dtype=bool)
    if "rlnCtfDataAreCtfPremultiplied" in table.columns:
        premultiplied = _numbers(table, "rlnCtfDataAreCtfPremultiplied", rows) != 0

    # image names -> stacks; validated against the stack headers
    name_ok = table["rlnImageName"].notna().to_numpy()
    rows.report(~name_ok, lambda i: "rlnImageName is missing", "give every particle an index@stack image name")
    base_dir = Path(root) if root is not None else path.parent
    if root is not None and not base_dir.is_dir():
        raise InputError(f"--root {root}: folder not found; give the folder the image paths are relative to")
    stack_paths, stack_indices, raw_paths = resolve_image_names(
        table["rlnImageName"].fillna("").to_numpy(dtype=object), base_dir, rows, encoding=encoding)

    if class_number is not None:
        if classes is None:
            raise InputFileError("has no rlnClassNumber column, so no class can be selected", path,
                                 "drop the class selection")
        rows.unwanted |= classes != int(class_number)
        if not rows.live.any():
            present = ", ".join(str(c) for c in np.unique(classes[~rows.bad])[:20])
            raise InputFileError(f"has no particles of class {class_number} (classes present: {present})", path,
                                 "choose one of the classes present")

    image_size = _integers(table, "rlnImageSize", rows) if "rlnImageSize" in table.columns else None
    box = check_stacks(stack_paths, stack_indices, raw_paths, rows, root_given=root is not None,
                       image_size=image_size)
    n_unselected = int(rows.unwanted.sum())
    keep = rows.finish()

    if angpix is not None:
        pixel_size = float(angpix)
    else:
        kept_px = file_px[keep]
        ref = float(kept_px[0])
        differs = np.abs(kept_px - ref) > 1e-4 * ref
        if differs.any():
            groups = optics_group[keep]
            seen: dict[float, int] = {}
            for value, g in zip(kept_px, groups):
                seen.setdefault(round(float(value), 6), int(g))
            listing = ", ".join(f"{v:g} A (optics group {g})" for v, g in list(seen.items())[:4])
            raise InputFileError(f"particles have different pixel sizes: {listing}", path,
                                 "reconstruct one pixel size at a time (split the file by optics group)")
        pixel_size = ref

    if half_set[keep].any() and not half_set[keep].all():
        n0 = int((half_set[keep] == 0).sum())
        raise InputFileError(f"mixes particles with and without a half set: {n0} have rlnRandomSubset 0", path,
                             "set rlnRandomSubset to 1 or 2 for every particle, or remove the column "
                             "for a seeded random split")

    sel = np.flatnonzero(keep)
    out_table = table.iloc[sel].reset_index(drop=True)
    optics_out = optics.reset_index(drop=True) if optics is not None else None
    meta = {
        "format": "star",
        "star_version": version,
        "pixel_size_source": "--angpix" if angpix is not None else px_source,
        "n_stacks": int(len(factorize_paths(stack_paths[sel])[1])),
        "root": None if root is None else os.path.abspath(root),
        # the folder the rlnImageName paths were resolved against (write_star keep_input_names)
        "image_base": os.path.abspath(base_dir),
        "text_encoding": encoding,
    }
    if class_number is not None:
        meta["class_selected"] = int(class_number)
        meta["n_other_classes"] = n_unselected
    return ParticleSet(
        table=out_table,
        stack_paths=stack_paths[sel].astype(object),
        stack_indices=stack_indices[sel],
        rotations=euler_to_matrix(rot[sel], tilt[sel], psi[sel]).reshape(-1, 3, 3),
        shifts_px=shifts_px[sel],
        ctf={k: v[sel].astype(np.float64) for k, v in ctf.items()},
        pixel_size_angstrom=pixel_size,
        box_size=box,
        half_set=half_set[sel],
        optics_group=optics_group[sel],
        optics=optics_out,
        class_number=None if classes is None else classes[sel],
        ctf_premultiplied=premultiplied[sel],
        source=path,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def format_image_names(stack_paths: np.ndarray, stack_indices: np.ndarray, folder: str | os.PathLike) -> np.ndarray:
    """``%06d@path`` image names (1-based index) for a file written in ``folder``.

    Paths are relative to ``folder`` when the stack and the folder share a directory below the
    file-system root (so moving a project folder keeps the links valid), absolute otherwise.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` object array of str.
    """
    base = os.path.abspath(os.fspath(folder))
    inverse, unique_paths = factorize_paths(stack_paths)
    rel = []
    for p in unique_paths:
        p = os.path.abspath(p)
        try:
            common = os.path.commonpath([p, base])
            shared = os.path.dirname(common) != common  # common is not the file-system root
            rel.append(os.path.relpath(p, base) if shared else p)
        except ValueError:  # another drive (Windows)
            rel.append(p)
    rel_arr = np.array(rel, dtype=object)[inverse] if rel else np.empty(0, dtype=object)
    idx = np.asarray(stack_indices, dtype=np.int64) + 1
    return np.array([f"{i:06d}@{p}" for i, p in zip(idx.tolist(), rel_arr.tolist())], dtype=object)


def image_name_root(particles: ParticleSet, folder: str | os.PathLike) -> Path:
    """The folder that :func:`write_star` with ``keep_input_names=True`` writes image paths relative to.

    The root the particles were read with: ``--root`` when given (``meta["root"]``), else the
    folder of the STAR file they were read from (its image paths are relative to it); particles
    that did not come from a STAR file (``.thu``, simulated) use the root when given, else
    ``folder`` (the output file's folder).
    """
    meta = particles.meta
    if meta.get("root"):
        return Path(meta["root"])
    if meta.get("format") == "star":
        if meta.get("image_base"):
            return Path(meta["image_base"])
        if particles.source is not None:
            return Path(os.path.abspath(os.path.dirname(os.fspath(particles.source))))
    return Path(os.path.abspath(os.fspath(folder)))


def _unchanged_input_names(particles: ParticleSet, base: Path, encoding: str) -> np.ndarray:
    """``(n,)`` bool: rows whose input ``rlnImageName`` text still names the row's image.

    True for the rows of a STAR input that were kept, dropped or reordered (``subset``), False
    where the text is missing or the row now points at another stack or index.
    """
    n = len(particles)
    if (particles.meta.get("format") != "star" or "rlnImageName" not in particles.table.columns
            or n == 0):
        return np.zeros(n, dtype=bool)
    names = particles.table["rlnImageName"].to_numpy(dtype=object)
    has_text = np.array([isinstance(v, str) and v.strip() != "" for v in names.tolist()], dtype=bool)
    rows = RowProblems(particles.source or "particles", np.arange(1, n + 1), "particle row", permissive=True)
    stack_paths, indices, _ = resolve_image_names(np.where(has_text, names, "1@?"), base, rows,
                                                  encoding=encoding)
    same_stack = np.asarray(stack_paths, dtype=object) == np.asarray(particles.stack_paths, dtype=object)
    return has_text & ~rows.bad & same_stack & (indices == np.asarray(particles.stack_indices, dtype=np.int64))


def _output_image_names(particles: ParticleSet, folder: Path, encoding: str, keep_input_names: bool) -> np.ndarray:
    """The ``rlnImageName`` text to write (in the table's text encoding, see :func:`_as_written`)."""
    if not keep_input_names:
        names = format_image_names(particles.stack_paths, particles.stack_indices, folder)
    else:
        base = image_name_root(particles, folder)
        same = _unchanged_input_names(particles, base, encoding)
        names = np.empty(len(particles), dtype=object)
        if same.any():
            names[same] = particles.table["rlnImageName"].to_numpy(dtype=object)[same]
        if (~same).any():
            other = format_image_names(particles.stack_paths[~same], particles.stack_indices[~same], base)
            if encoding != "utf-8":
                other = np.array([os.fsencode(n).decode(encoding) for n in other.tolist()], dtype=object)
            names[~same] = other
        return names
    if encoding != "utf-8":  # file-system names (undecodable bytes as surrogates) in the table's Latin-1 text
        names = np.array([os.fsencode(n).decode(encoding) for n in names.tolist()], dtype=object)
    return names


def _angstrom_origin(shift_px: np.ndarray, pixel_size: float, hint: np.ndarray | None) -> np.ndarray:
    """Origins in Angstrom that read back (divided by ``pixel_size``) to exactly ``shift_px``.

    Prefers the input's own value (``hint``) so unchanged files round-trip text-exactly; otherwise
    nudges ``shift_px * pixel_size`` by a few ulps until the division reproduces the shift.
    """
    out = shift_px * pixel_size
    if hint is not None:
        with np.errstate(invalid="ignore"):
            same = np.isfinite(hint) & (hint / pixel_size == shift_px)
        out = np.where(same, hint, out)
    bad = out / pixel_size != shift_px
    for step in range(1, 5):
        if not bad.any():
            break
        for direction in (np.inf, -np.inf):
            trial = out.copy()
            for _ in range(step):
                trial = np.nextafter(trial, direction)
            fixed = bad & (trial / pixel_size == shift_px)
            out = np.where(fixed, trial, out)
            bad &= ~fixed
    return out


def _as_written(text: str, encoding: str) -> str:
    """``text`` as the str whose ``utf-8``/``surrogateescape`` encoding is the bytes to write.

    Text read from a Latin-1 (non-UTF-8) file goes back to the file's own bytes; text that cannot
    have come from such a file (characters beyond Latin-1) is written as UTF-8.
    """
    if encoding == "utf-8":
        return text
    try:
        return text.encode(encoding).decode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text


def _format_column(label: str, values: pd.Series, encoding: str = "utf-8") -> list[str]:
    if pdt.is_bool_dtype(values):
        return [str(int(v)) for v in values.tolist()]
    if pdt.is_integer_dtype(values):
        return [str(int(v)) for v in values.tolist()]
    if pdt.is_float_dtype(values):
        floats = values.to_numpy(dtype=np.float64)
        if label in _INTEGER_LABELS and np.isfinite(floats).all() and (floats == np.round(floats)).all():
            return [str(int(v)) for v in floats.tolist()]
        return [repr(v) for v in floats.tolist()]  # shortest text that reads back to the same float
    return [quote("" if v is None or (isinstance(v, float) and math.isnan(v)) else _as_written(str(v), encoding))
            for v in values.tolist()]


def _format_block(name: str, table: pd.DataFrame, encoding: str = "utf-8") -> str:
    """One ``data_<name>`` loop (:func:`numba_recon.io.star_text.loop_block`); text values in
    ``encoding`` (see :func:`_as_written`)."""
    columns = {_as_written(str(label), encoding): _format_column(label, table[label], encoding)
               for label in table.columns}
    return loop_block(name, columns, STAR_VERSION_WRITTEN)


def write_star(particles: ParticleSet, path: str | os.PathLike, *,
               extra_columns: dict[str, np.ndarray] | None = None, keep_input_names: bool = False) -> np.ndarray:
    """Write particles as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``), atomically.

    Poses, origins (``rlnOriginXAngst/YAngst``), CTF values, optics groups, half sets and classes
    come from the :class:`ParticleSet` arrays; every other column of ``particles.table`` (e.g.
    ``rlnMicrographName``, ``rlnCoordinateX``) is carried over unchanged. Values are written as the
    shortest text that reads back to the same number, so read -> write -> read is exact. Text is
    UTF-8; text read from a file that was not valid UTF-8 (``meta["text_encoding"] == "latin-1"``)
    is written back as the bytes it was read from. The file starts with two comment lines naming
    the numba-recon version and the command line (:func:`numba_recon.provenance.comment_lines`).

    Parameters
    ----------
    particles
        The particles to write.
    path
        Output ``.star`` file; replaced if it exists (callers check ``--overwrite``).
    extra_columns
        Additional per-particle columns, label (without the leading underscore) -> ``(n,)``
        array; they replace table columns of the same label.
    keep_input_names
        How image names are written. False (``convert``, the simulator): ``%06d@path`` with paths
        relative to the output file's folder. True (``run``'s ``run_data.star``, ``select``): in the
        input's own form, as RELION writes them: a row whose input ``rlnImageName`` still names its
        image is written with that text unchanged; any other row as ``%06d@path`` relative to
        :func:`image_name_root` (the ``--root`` the input was read with, else the input STAR
        file's folder; for ``.thu`` or simulated particles the root, else the output folder).
        Such a file is read with the same root as its input.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` object array: the image names written, as text (keys of the score side table,
        :func:`write_particle_scores`).
    """
    n = len(particles)
    path = Path(path)
    table = particles.table.reset_index(drop=True)
    if len(table) != n:
        raise ValueError(f"particles.table has {len(table)} rows for {n} particles")
    px = float(particles.pixel_size_angstrom)
    groups = np.asarray(particles.optics_group, dtype=np.int64).reshape(-1)
    unique_groups = np.unique(groups)

    # --- data_optics -----------------------------------------------------------------------
    in_optics = particles.optics
    in_by_group: dict[int, dict] = {}
    if in_optics is not None and "rlnOpticsGroup" in in_optics.columns:
        for record in in_optics.to_dict("records"):
            in_by_group[int(record["rlnOpticsGroup"])] = record
    # Voltage, Cs, amplitude contrast and the premultiplied flag are optics values in RELION 3.1;
    # where they vary inside a group (particle-level overrides) the per-particle values are also
    # written in data_particles, which RELION reads first (CTF::readByGroup).
    group_level = {
        "rlnVoltage": particles.ctf["voltage_kv"],
        "rlnSphericalAberration": particles.ctf["cs_mm"],
        "rlnAmplitudeContrast": particles.ctf["amplitude_contrast"],
    }
    premultiplied = np.asarray(particles.ctf_premultiplied, dtype=bool).reshape(-1)
    if (premultiplied.any() or "rlnCtfDataAreCtfPremultiplied" in table.columns
            or (in_optics is not None and "rlnCtfDataAreCtfPremultiplied" in in_optics.columns)):
        group_level["rlnCtfDataAreCtfPremultiplied"] = premultiplied.astype(np.int64)
    authoritative = {"rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnImageSize",
                     "rlnImageDimensionality", "rlnOriginX", "rlnOriginY"} | set(group_level)
    # other optics-level labels carried in the merged table go back to data_optics when constant per group
    candidates = [c for c in table.columns
                  if (c in OPTICS_LABELS or (in_optics is not None and c in in_optics.columns))
                  and c not in authoritative]
    moved: list[str] = []
    first_rows = None
    if n and candidates:
        per_group = table[candidates].assign(_group=groups).groupby("_group")
        nunique = per_group.nunique(dropna=False)
        moved = [c for c in candidates if (nunique[c] <= 1).all()]
        first_rows = per_group.first()
    particle_level: dict[str, np.ndarray] = {}
    group_values: dict[str, dict[int, object]] = {}
    for label, values in group_level.items():
        frame = pd.DataFrame({"g": groups, "v": values})
        varying = n > 0 and bool((frame.groupby("g")["v"].nunique() > 1).any())
        first = frame.groupby("g")["v"].first().to_dict()
        if varying:
            particle_level[label] = values
            # keep the input's optics value where there is one; else the group's first particle's
            first = {g: in_by_group.get(g, {}).get(label, v) for g, v in first.items()}
        group_values[label] = first

    optics_columns = ["rlnOpticsGroup", "rlnOpticsGroupName"]
    if in_optics is not None:
        optics_columns += [c for c in in_optics.columns if c not in optics_columns]
    for c in moved + list(group_level) + ["rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]:
        if c not in optics_columns:
            optics_columns.append(c)
    optics_rows = []
    for g in unique_groups.tolist():
        row = dict(in_by_group.get(g, {}))
        if first_rows is not None:
            row.update({c: first_rows.loc[g, c] for c in moved})
        name = row.get("rlnOpticsGroupName")
        if name is None or (isinstance(name, float) and math.isnan(name)):
            row["rlnOpticsGroupName"] = f"opticsGroup{g}"
        row["rlnOpticsGroup"] = g
        for label, by_group in group_values.items():
            row[label] = by_group[g]
        row["rlnImagePixelSize"] = px
        row["rlnImageSize"] = int(particles.box_size)
        row.setdefault("rlnImageDimensionality", 2)
        optics_rows.append(row)
    optics_table = pd.DataFrame(optics_rows, columns=optics_columns)

    # --- data_particles --------------------------------------------------------------------
    drop = (set(moved) | authoritative) - {"rlnOpticsGroup"} - set(particle_level)
    out = table[[c for c in table.columns if c not in drop]].copy()

    rotations = np.asarray(particles.rotations, dtype=np.float64).reshape(-1, 3, 3)
    angles = np.empty((n, 3), dtype=np.float64)
    reuse = np.zeros(n, dtype=bool)
    if n and all(c in table.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        given = np.stack([pd.to_numeric(table[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                          for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)
        finite = np.isfinite(given).all(axis=1)
        if finite.any():
            A = euler_to_matrix(given[finite, 0], given[finite, 1], given[finite, 2]).reshape(-1, 3, 3)
            reuse[finite] = np.abs(A - rotations[finite]).max(axis=(1, 2)) <= 1e-12
        angles[reuse] = given[reuse]
    if (~reuse).any():
        angles[~reuse] = matrix_to_euler(rotations[~reuse]).reshape(-1, 3)

    def hint(label: str) -> np.ndarray | None:
        if label not in table.columns:
            return None
        return pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)

    shifts = np.asarray(particles.shifts_px, dtype=np.float64).reshape(-1, 2)
    encoding = "latin-1" if particles.meta.get("text_encoding") == "latin-1" else "utf-8"
    image_names = _output_image_names(particles, path.parent, encoding, keep_input_names)
    values: dict[str, np.ndarray] = {
        "rlnImageName": image_names,
        "rlnAngleRot": angles[:, 0],
        "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": _angstrom_origin(shifts[:, 0], px, hint("rlnOriginXAngst")),
        "rlnOriginYAngst": _angstrom_origin(shifts[:, 1], px, hint("rlnOriginYAngst")),
        "rlnDefocusU": particles.ctf["defocus_u_angstrom"],
        "rlnDefocusV": particles.ctf["defocus_v_angstrom"],
        "rlnDefocusAngle": particles.ctf["defocus_angle_deg"],
    }
    for key, label in (("phase_shift_deg", "rlnPhaseShift"), ("bfactor_angstrom2", "rlnCtfBfactor"),
                       ("scale", "rlnCtfScalefactor")):
        default = CTF_LABELS[key][1]
        if label in table.columns or np.any(particles.ctf[key] != default):
            values[label] = particles.ctf[key]
    values.update(particle_level)
    values["rlnOpticsGroup"] = groups
    if "rlnRandomSubset" in table.columns or np.any(particles.half_set != 0):
        values["rlnRandomSubset"] = np.asarray(particles.half_set, dtype=np.int64)
    if particles.class_number is not None:
        values["rlnClassNumber"] = np.asarray(particles.class_number, dtype=np.int64)
    for label, column in (extra_columns or {}).items():
        column = np.asarray(column)
        if column.shape != (n,):
            raise ValueError(f"extra column {label!r} has shape {column.shape}, expected ({n},)")
        values[label.lstrip("_")] = column
    for label, column in values.items():
        out[label] = column

    with atomic_output(path) as tmp:
        # surrogateescape: _as_written maps the bytes of a non-UTF-8 input to lone surrogates, written back as bytes
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("\n".join(comment_lines(star=True)) + "\n")
            f.write(_format_block("optics", optics_table, encoding))
            f.write(_format_block("particles", out, encoding))
    return image_names


# --------------------------------------------------------------------------------------------
# the per-particle score table beside run_data.star
# --------------------------------------------------------------------------------------------

#: Columns of the score table (``run_data_scores.csv``) -> the ``run_data.star`` label that held the
#: same values before the table existed (still read by :func:`read_particle_scores`).
SCORE_COLUMNS: dict[str, str] = {
    "loss": "rlnNumbaReconLoss",
    "score": "rlnNumbaReconScore",
    "weight": "rlnNumbaReconWeight",
    "kept": "rlnNumbaReconKept",
    "half_set": "rlnNumbaReconHalfSet",
    "cross_validation": "rlnNumbaReconCrossValidation",
}
#: Integer columns of the score table.
_INTEGER_SCORE_COLUMNS = frozenset({"kept", "half_set", "cross_validation"})
#: Key column of the score table: the image name exactly as written in the STAR file beside it.
SCORE_KEY = "image_name"


def scores_path(star_path: str | os.PathLike) -> Path:
    """The score table of a particle STAR file: ``run_data.star`` -> ``run_data_scores.csv``."""
    p = Path(star_path)
    return p.with_name(p.stem + "_scores.csv")


def without_score_columns(particles: ParticleSet) -> ParticleSet:
    """The particles without the ``rlnNumbaRecon*`` columns an older ``run_data.star`` carried
    (RELION warns about every label it does not know; the values now live in the score table)."""
    from dataclasses import replace

    stale = [c for c in particles.table.columns if str(c).startswith("rlnNumbaRecon")]
    if not stale:
        return particles
    return replace(particles, table=particles.table.drop(columns=stale), meta=dict(particles.meta))


def write_particle_scores(path: str | os.PathLike, image_names: Sequence[str], columns: dict[str, np.ndarray], *,
                          encoding: str = "utf-8") -> None:
    """Write the per-particle score table (CSV), atomically.

    Two comment lines (version, command line), a header row, then one row per particle in the
    order of the STAR file it belongs to: ``image_name`` (the ``rlnImageName`` text of that file)
    followed by ``columns`` in the order given. Numbers are written as the shortest text that reads
    back to the same value.

    Parameters
    ----------
    path
        Output ``.csv`` (see :func:`scores_path`).
    image_names
        ``(n,)`` the image names as written in the STAR file (what :func:`write_star` returns).
    columns
        Column name -> ``(n,)`` values (keys of :data:`SCORE_COLUMNS`, or others).
    encoding
        The STAR file's text encoding (``meta["text_encoding"]``): names read from a Latin-1 file
        are written as the same bytes as in the STAR file.
    """
    import csv
    import io

    names = [str(v) for v in np.asarray(image_names, dtype=object).tolist()]
    n = len(names)
    arrays = {name: np.asarray(values).reshape(-1) for name, values in columns.items()}
    for name, values in arrays.items():
        if values.shape != (n,):
            raise ValueError(f"score column {name!r} has shape {values.shape}, expected ({n},)")
    text = {}
    for name, values in arrays.items():
        if name in _INTEGER_SCORE_COLUMNS or pdt.is_integer_dtype(values.dtype) or pdt.is_bool_dtype(values.dtype):
            text[name] = [str(int(v)) for v in values.tolist()]
        else:
            text[name] = [repr(float(v)) for v in values.tolist()]
    buf = io.StringIO()
    buf.write("\n".join(comment_lines()) + "\n")
    writer = csv.writer(buf, lineterminator="\n")
    # a row whose name starts with "#" is quoted, or readers would skip it as a comment line
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow([SCORE_KEY, *arrays])
    for i, name in enumerate(names):
        row = [_as_written(name, encoding), *(text[c][i] for c in arrays)]
        (quoted if row[0].startswith("#") else writer).writerow(row)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(buf.getvalue())


def _read_score_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(image names, column -> text values) of a score table; comment lines skipped."""
    import csv

    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            rows = list(csv.reader(line for line in f if not line.startswith("#")))
    except OSError as err:
        raise InputFileError(f"cannot read the file ({err.strerror})", path, "check the path and permissions") from None
    if not rows or not rows[0] or rows[0][0] != SCORE_KEY:
        raise InputFileError(f"is not a score table (its first column is not {SCORE_KEY})", path,
                             "rerun numba-recon run, or remove the file to use the STAR file's own columns")
    header, body = rows[0], rows[1:]
    short = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if short is not None:
        raise InputFileError(f"row {short + 1} has {len(body[short])} values for {len(header)} columns", path,
                             "rerun numba-recon run to write the table again")
    values = {name: [r[k] for r in body] for k, name in enumerate(header) if k > 0}
    return [r[0] for r in body], values


def read_particle_scores(star_path: str | os.PathLike, table: pd.DataFrame, *,
                         encoding: str = "utf-8") -> pd.DataFrame | None:
    """The per-particle scores of a particle STAR file, one row per row of ``table``.

    From the score table beside the file (:func:`scores_path`, written by ``numba-recon run``),
    matched by image name; else from the ``rlnNumbaRecon*`` columns an older ``run_data.star``
    carries (:data:`SCORE_COLUMNS`). A STAR file that lost or reordered rows since (a RELION
    subset of ``run_data.star`` saved under the same name) still finds its rows by name.

    Parameters
    ----------
    star_path
        The STAR file the table was read from.
    table
        ``ParticleSet.table`` of that file (``rlnImageName`` as read).
    encoding
        ``meta["text_encoding"]`` of that file.

    Returns
    -------
    pandas.DataFrame or None
        Columns of :data:`SCORE_COLUMNS` present (``score``, ``kept``...), float64 (integers for
        ``kept``, ``half_set``, ``cross_validation``), index ``0..n-1``; None when the file has
        neither a score table nor score columns.

    Raises
    ------
    InputFileError
        The score table is malformed, or lacks an image of the STAR file (both would attach scores
        to the wrong particles).
    """
    side = scores_path(star_path)
    n = len(table)
    if side.is_file():
        names, values = _read_score_table(side)
        wanted = [_as_written(str(v), encoding) for v in table["rlnImageName"].tolist()]
        position: dict[str, int] = {}
        repeated = False
        for i, name in enumerate(names):
            repeated |= name in position
            position[name] = i
        if not repeated:
            missing = [w for w in wanted if w not in position]
            if missing:
                raise InputFileError(f"has no row for image {missing[0]} of {Path(star_path).name} "
                                     f"({len(missing)} of {n} images missing)", side,
                                     "use the score table written with this STAR file, or remove it")
            order = np.array([position[w] for w in wanted], dtype=np.int64)
        elif len(names) == n and names == wanted:  # images repeated: only the file's own row order is safe
            order = np.arange(n)
        else:
            raise InputFileError("names some images twice and does not list the STAR file's rows in order", side,
                                 "use the score table written with this STAR file, or remove it")
        out = {}
        for name, text in values.items():
            numbers = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
            numbers = numbers[order]
            out[name] = (np.where(np.isfinite(numbers), numbers, 0).astype(np.int64)
                         if name in _INTEGER_SCORE_COLUMNS else numbers)
        return pd.DataFrame(out, index=pd.RangeIndex(n))
    present = {short: label for short, label in SCORE_COLUMNS.items() if label in table.columns}
    if not present:
        return None
    out = {}
    for short, label in present.items():
        numbers = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
        out[short] = (np.where(np.isfinite(numbers), numbers, 0).astype(np.int64)
                      if short in _INTEGER_SCORE_COLUMNS else numbers)
    return pd.DataFrame(out, index=pd.RangeIndex(n))
