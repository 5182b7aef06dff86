"""Point-group names: parsing only, no operators.

Kept apart from :mod:`numba_recon.symmetry.groups` (numpy, Numba kernels) so that the run configuration
can check a ``--sym`` value without loading the operator machinery.
"""

from __future__ import annotations

import re

from numba_recon.errors import InputError

#: Names accepted by :func:`parse_symmetry_name` (``n >= 1`` for ``Cn`` and ``Dn``).
VALID_NAMES = ("C1", "Cn", "Dn", "T", "O", "I", "I1", "I2", "I3", "I4")

#: The largest n of Cn and Dn (RELION's point groups in practice stay far below it).
MAX_CYCLIC_ORDER = 360


def parse_symmetry_name(name: str) -> str:
    """The canonical name of a point group: upper case, ``I`` as ``I2``, ``C07`` as ``C7``.

    Raises
    ------
    InputError
        Unknown name (the message lists the valid ones), or ``Cn``/``Dn`` with
        ``n > MAX_CYCLIC_ORDER``.
    """
    key = str(name).strip().upper()
    if key == "I":
        return "I2"
    if key in ("T", "O", "I1", "I2", "I3", "I4"):
        return key
    m = re.fullmatch(r"([CD])(\d+)", key)
    if m and int(m.group(2)) >= 1:
        n = int(m.group(2))
        if n > MAX_CYCLIC_ORDER:
            # beyond this the rotations are closer than the tolerance that tells operators apart: the
            # group would not close (or collapse to C1 without a word)
            raise InputError(f"symmetry group {name!r} has an order of {n}",
                             fix=f"n must be between 1 and {MAX_CYCLIC_ORDER} for Cn and Dn")
        return f"{m.group(1)}{n}"
    raise InputError(f"unknown symmetry group {name!r}",
                     fix=f"use one of {', '.join(VALID_NAMES)} (case-insensitive, n >= 1, e.g. C7 or D7)")
