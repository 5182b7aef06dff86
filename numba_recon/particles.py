"""The one particle data model the pipeline consumes.

Readers (``io/star.py``, ``io/thu.py``, via ``read.py``) return a :class:`ParticleSet`; the
simulator builds one; the engine batches over it; writers turn it back into STAR or ``.thu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: The smallest image box (pixels) a reconstruction accepts: the default support radius N/2 - 1 must
#: reach 3 px, or the map is a few voxels and its "resolution" meaningless.
MIN_BOX_PX = 8

#: Keys of :attr:`ParticleSet.ctf`, each an ``(n,)`` float64 array, units in the names.
CTF_KEYS = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_deg",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_deg",
    "bfactor_angstrom2",
    "scale",
)


@dataclass
class ParticleSet:
    """Particles with known poses and CTF parameters.

    Attributes
    ----------
    table
        Every input column, one row per particle, with RELION labels without the leading
        underscore (``rlnAngleRot``...), optics values merged in. Kept so outputs can carry every
        input column back out (``run_data.star``).
    optics
        The optics table (RELION >= 3.1 style), one row per optics group, or None.
    stack_paths
        ``(n,)`` object array of resolved stack file paths (str).
    stack_indices
        ``(n,)`` int64, 0-based index of each particle's image in its stack.
    rotations
        ``(n, 3, 3)`` float64 RELION matrices ``A`` (map -> image frame).
    shifts_px
        ``(n, 2)`` float64 ``(origin_x, origin_y)`` in pixels with RELION's sign: the data term
        uses ``T^{-1} b``, the image moved by ``+origin``.
    ctf
        Dict of ``(n,)`` float64 arrays, keys :data:`CTF_KEYS`.
    pixel_size_angstrom
        Pixel size of the images (one value for the whole set).
    box_size
        Image side length ``N`` in pixels.
    half_set
        ``(n,)`` int8: 1 or 2 (gold-standard half), 0 where the input has none.
    optics_group
        ``(n,)`` int64, 1-based.
    class_number
        ``(n,)`` int64 (1-based) or None when the input has no classes.
    ctf_premultiplied
        ``(n,)`` bool, True where the images are already multiplied by the CTF.
    source
        Path of the file the set was read from, or None.
    """

    table: pd.DataFrame
    stack_paths: np.ndarray
    stack_indices: np.ndarray
    rotations: np.ndarray
    shifts_px: np.ndarray
    ctf: dict[str, np.ndarray]
    pixel_size_angstrom: float
    box_size: int
    half_set: np.ndarray
    optics_group: np.ndarray
    optics: pd.DataFrame | None = None
    class_number: np.ndarray | None = None
    ctf_premultiplied: np.ndarray | None = None
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.stack_indices)
        if self.ctf_premultiplied is None:
            self.ctf_premultiplied = np.zeros(n, dtype=bool)
        for key in CTF_KEYS:
            if key not in self.ctf:
                raise ValueError(f"ParticleSet.ctf lacks {key!r}")

    def __len__(self) -> int:
        return int(len(self.stack_indices))

    def subset(self, selection) -> "ParticleSet":
        """A new set with the rows picked by a boolean mask or an index array (table re-indexed)."""
        sel = np.asarray(selection)
        if sel.dtype == bool:
            sel = np.flatnonzero(sel)
        return replace(
            self,
            table=self.table.iloc[sel].reset_index(drop=True),
            stack_paths=self.stack_paths[sel],
            stack_indices=self.stack_indices[sel],
            rotations=self.rotations[sel],
            shifts_px=self.shifts_px[sel],
            ctf={k: v[sel] for k, v in self.ctf.items()},
            half_set=self.half_set[sel],
            optics_group=self.optics_group[sel],
            class_number=None if self.class_number is None else self.class_number[sel],
            ctf_premultiplied=self.ctf_premultiplied[sel],
            meta=dict(self.meta),
        )

    def read_images(self, index: np.ndarray, reader: "Any | None" = None) -> np.ndarray:
        """Images of the particles at positions ``index``: ``(b, N, N)`` float32, native byte order.

        Reads through a :class:`numba_recon.io.mrc.StackReader` (``reader``, or one
        kept on this set), so only the requested images are touched.
        """
        if reader is None:
            reader = self.meta.get("_reader")
            if reader is None:
                from numba_recon.io.mrc import StackReader

                reader = StackReader()
                self.meta["_reader"] = reader
        index = np.asarray(index, dtype=np.int64)
        return reader.read(self.stack_paths[index], self.stack_indices[index], self.box_size)
