"""File formats: RELION STAR (``star.py``), THUNDER ``.thu`` (``thu.py``) and MRC (``mrc.py``).

The public readers and writers are re-exported here and imported on first use, so
``import numba_recon.io`` stays cheap. Every writer goes through
:func:`numba_recon.io.atomic.atomic_output`: the file is written under a hidden temporary name in
the destination folder and moved onto the final name only when complete, so an interrupted run
never leaves a half-written file under the final name. Each write is reported to the output
manifest (:mod:`numba_recon.manifest`), which is what lets ``--overwrite`` remove exactly the files
numba-recon wrote.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "StackReader",
    "atomic_output",
    "read_star",
    "read_thu",
    "read_volume",
    "stack_shape",
    "write_stack",
    "write_star",
    "write_thu",
    "write_volume",
]

# public name -> submodule that defines it (imported lazily by __getattr__)
_LAZY = {
    "atomic_output": "atomic",
    "read_star": "star",
    "write_star": "star",
    "read_thu": "thu",
    "write_thu": "thu",
    "StackReader": "mrc",
    "stack_shape": "mrc",
    "read_volume": "mrc",
    "write_volume": "mrc",
    "write_stack": "mrc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
