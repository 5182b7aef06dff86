"""The one STAR text formatter: how every STAR file numba-recon writes (``run_data.star``,
``run_model.star``, ``postprocess.star``, the particle files of ``simulate`` and ``convert``)
quotes text, writes numbers and lays out its blocks, as RELION 3.1+ writes them.

- a block starts with ``# version 30001``, then ``data_<name>``;
- a table is ``loop_``, one ``_label #i`` line per column, then one line per row;
- a single record is one ``_label value`` line per field, labels padded to one width;
- a text value that is empty, holds white space, or starts with ``#``, ``_``, a quote, ``data_``
  or ``loop_`` is written in double quotes (a double quote inside it becomes a single quote);
- numbers: integers as integers, booleans as 0/1, floats as the shortest text that reads back to
  the same double.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: The STAR version line RELION 3.1+ writes.
STAR_VERSION = 30001


def quote(text: str) -> str:
    """``text`` as a STAR value: in double quotes when a reader would otherwise misread it."""
    if text == "" or any(c.isspace() for c in text) or text[0] in "#_'\"" or text.startswith(("data_", "loop_")):
        return '"' + text.replace('"', "'") + '"'
    return text


def format_number(value: Any) -> str:
    """An integer, boolean or float as STAR text (floats: the shortest exact text, ``repr``)."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def format_value(value: Any) -> str:
    """Any value as STAR text: text (and paths) quoted as needed, numbers by :func:`format_number`."""
    if value is None:
        return quote("")
    if isinstance(value, (str, os.PathLike)):
        return quote(os.fspath(value))
    return format_number(value)


def loop_block(name: str, columns: Mapping[str, Sequence[str]], version: int = STAR_VERSION) -> str:
    """A ``data_<name>`` table; ``columns`` maps labels (without ``_``) to their values, already
    formatted as text (:func:`format_value`, or a writer's own number format), all of one length."""
    lines = [f"\n# version {version}\n", f"data_{name}\n", "loop_"]
    lines += [f"_{label} #{i}" for i, label in enumerate(columns, start=1)]
    lines += [" ".join(row) for row in zip(*columns.values())]
    return "\n".join(lines) + "\n\n"


def record_block(name: str, pairs: Iterable[tuple[str, str]], version: int = STAR_VERSION) -> str:
    """A ``data_<name>`` block of single ``_label value`` fields (values already formatted)."""
    pairs = list(pairs)
    width = max((len(label) for label, _ in pairs), default=0) + 4
    lines = [f"\n# version {version}\n", f"data_{name}\n"]
    lines += [f"_{label:<{width}} {value}" for label, value in pairs]
    return "\n".join(lines) + "\n\n"


__all__ = ["STAR_VERSION", "format_number", "format_value", "loop_block", "quote", "record_block"]
