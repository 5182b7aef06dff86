"""The read stage: particle metadata in, one :class:`~numba_recon.particles.ParticleSet` out.

``read_particles`` picks the reader by file extension: ``.star`` (RELION 3.0 to 5,
:func:`numba_recon.io.star.read_star`) or ``.thu`` (THUNDER, :func:`numba_recon.io.thu.read_thu`).
Images stay on disk; :meth:`ParticleSet.read_images` memory-maps them batch by batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from numba_recon.errors import InputFileError
from numba_recon.particles import ParticleSet

__all__ = ["PARTICLE_SUFFIXES", "read_particles"]

#: File extensions :func:`read_particles` understands.
PARTICLE_SUFFIXES = (".star", ".thu")


def duplicate_images(particles: ParticleSet) -> np.ndarray:
    """Rows whose image (the same index of the same stack file) already appeared in an earlier row,
    ``(k,)`` int64 row numbers (0-based)."""
    # one realpath per stack file, not per row (10^6 rows share a few thousand stacks)
    stacks, stack_id = np.unique(np.asarray([str(p) for p in particles.stack_paths], dtype=object),
                                 return_inverse=True)
    real = np.unique([os.path.realpath(str(p)) for p in stacks], return_inverse=True)[1]
    keys = real[stack_id].astype(np.int64) * (int(np.max(particles.stack_indices, initial=0)) + 1)
    keys += np.asarray(particles.stack_indices, dtype=np.int64)
    _, first = np.unique(keys, return_index=True)
    repeated = np.ones(keys.size, dtype=bool)
    repeated[first] = False
    return np.flatnonzero(repeated)


def _plausible(particles: ParticleSet, path: Path, permissive: bool) -> ParticleSet:
    """Refuse (or, permissive, drop) physically impossible values; warn about implausible ones."""
    from numba_recon.plausibility import check_plausibility, drop_impossible

    if permissive:
        particles = drop_impossible(particles, path)
    check_plausibility(particles, path)
    return particles


def read_particles(path: str | os.PathLike, *, angpix: float | None = None, root: str | os.PathLike | None = None,
                   class_number: int | None = None, seed: int = 0, permissive: bool = False) -> ParticleSet:
    """Read particles with known poses and CTF parameters from a ``.star`` or ``.thu`` file.

    Parameters
    ----------
    path
        RELION STAR file (``.star``) or THUNDER file (``.thu``).
    angpix
        Pixel size in Angstrom: overrides the STAR file's value, required for ``.thu``.
    root
        Folder that relative image paths are relative to (default: the file's folder).
    class_number
        Keep only this class (``rlnClassNumber``; for ``.thu``, THUNDER's 0-based class + 1).
    seed
        Seed of the random half split of ``.thu`` files (STAR files keep ``rlnRandomSubset``).
    permissive
        Drop unusable particles with a ``RuntimeWarning`` instead of raising.

    Returns
    -------
    ParticleSet

    Raises
    ------
    InputFileError
        Missing file, unknown extension, any problem the format readers find, or a value that
        cannot be physical (:func:`numba_recon.plausibility.check_plausibility`, which also logs
        one warning per column of implausible values).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in PARTICLE_SUFFIXES:
        raise InputFileError(f"unknown particle file type {p.suffix or '(no extension)'!r}", p,
                             "give a RELION .star or a THUNDER .thu file")
    if not p.exists():
        raise InputFileError("file not found", p, "check the path")
    if suffix == ".star":
        from numba_recon.io.star import read_star

        return _plausible(read_star(p, angpix=angpix, root=root, class_number=class_number, permissive=permissive),
                          p, permissive)

    from numba_recon.io.names import keyed_half_sets
    from numba_recon.io.thu import read_thu

    particles = read_thu(p, angpix=angpix, root=root, seed=seed, permissive=permissive)
    if class_number is None:
        return _plausible(particles, p, permissive)
    selected = particles.class_number == int(class_number)
    if not selected.any():
        present = ", ".join(str(c) for c in np.unique(particles.class_number)[:20])
        raise InputFileError(f"has no particles of class {class_number} (classes present: {present}; "
                             "a .thu class is its 0-based CLASS_ID + 1)", p, "choose one of the classes present")
    subset = particles.subset(selected)
    # split the selected class itself, so both halves get half of it
    subset.half_set = keyed_half_sets(subset.stack_paths, subset.stack_indices, seed)
    subset.table["rlnRandomSubset"] = subset.half_set.astype(np.int64)
    subset.meta["class_selected"] = int(class_number)
    return _plausible(subset, p, permissive)
