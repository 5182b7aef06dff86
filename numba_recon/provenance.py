"""Which numba-recon and which command wrote a file: the header lines of STAR and CSV outputs and
the labels of MRC outputs.

Every STAR, CSV and MRC file numba-recon writes names the version that wrote it and the command
line, so a file found on its own (copied out of its run folder, attached to a deposition) still
says where it came from:

- STAR and CSV files start with comment lines (``docs/file-formats.md``)::

      # numba-recon 0.1.0
      # command: numba-recon run particles.star -o recon

  RELION skips lines that start with ``#`` (``MetaDataTable::readStar``), ``starfile`` and
  ``pandas.read_csv(..., comment="#")`` too;
- MRC headers carry up to 10 labels of 80 characters: the first names the version, the file and
  the date, the following ones hold the command line (cut with ``...`` when it is longer).

The command line is ``sys.argv`` joined with :func:`shlex.join`, with the program shown as
``numba-recon`` also when started as ``python -m numba_recon``; it is kept on one line (control
characters are written as ``\\n``-style escapes) and encodable (bytes that are not UTF-8, which
``sys.argv`` carries as lone surrogates, are written as ``\\udcXX`` escapes).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["command_line", "comment_lines", "mrc_labels", "version_text"]

#: Characters in one MRC header label (MRC2014: 10 labels of 80 bytes).
MRC_LABEL_CHARS = 80
#: Labels in one MRC header.
MRC_MAX_LABELS = 10

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def version_text() -> str:
    """``numba-recon VERSION``."""
    from numba_recon import __version__

    return f"numba-recon {__version__}"


def environment() -> dict[str, Any]:
    """What produced a result: the version, the command's arguments, Python, numba and numpy
    versions, the host and the time (checkpoints and ``summary.json`` keep it)."""
    import platform

    import numba
    import numpy as np

    from numba_recon import __version__

    return {
        "version": __version__,
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "numba": numba.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, on one line: ``shlex.join(sys.argv)`` with the program as ``numba-recon``.

    Parameters
    ----------
    argv
        The arguments (default ``sys.argv``).
    """
    args = [str(a) for a in (sys.argv if argv is None else argv)]
    if args and os.path.basename(args[0]) in ("numba-recon", "__main__.py"):
        args[0] = "numba-recon"
    text = shlex.join(args)
    # one line: a newline inside an argument would end the comment line that holds it
    text = _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
    # undecodable argv bytes arrive as lone surrogates, which no UTF-8 writer accepts
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def comment_lines(*, star: bool = False) -> list[str]:
    """The header comment lines (without line ends) of a STAR or CSV file.

    Parameters
    ----------
    star
        Lines for a STAR file: RELION takes any line that *contains* ``data_`` for the start of a
        data block when it reads a file's first block, and a line containing ``# version `` for the
        file's version (``MetaDataTable::readStar``), so both are broken up in the command:
        ``data\\_`` (a shell reads it outside quotes as ``data_``) and ``#  version`` (two spaces).
    """
    command = command_line()
    if star:
        command = command.replace("data_", "data\\_").replace("# version", "#  version")
    return [f"# {version_text()}", f"# command: {command}"]


def mrc_labels(name: str, *, when: float | None = None) -> list[str]:
    """The labels of an MRC header: ``numba-recon VERSION NAME DATE``, then the command line.

    Parameters
    ----------
    name
        What the file is (e.g. ``run_class001``), shown in the first label.
    when
        Seconds since the epoch for the date (default: now).

    Returns
    -------
    list of str
        At most :data:`MRC_MAX_LABELS` ASCII labels of at most :data:`MRC_LABEL_CHARS` characters;
        the command fills the labels after the first and ends with ``...`` when it is cut.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    first = _ascii(f"{version_text()} {name} {stamp}")
    if len(first) > MRC_LABEL_CHARS:  # a long name: keep the version and the date
        keep = MRC_LABEL_CHARS - len(version_text()) - len(stamp) - 5
        first = _ascii(f"{version_text()} {name[:max(keep, 0)]}... {stamp}")[:MRC_LABEL_CHARS]
    command = _ascii("command: " + command_line())
    room = (MRC_MAX_LABELS - 1) * MRC_LABEL_CHARS
    if len(command) > room:
        command = command[: room - 3] + "..."
    rest = [command[i:i + MRC_LABEL_CHARS] for i in range(0, len(command), MRC_LABEL_CHARS)]
    return [first, *rest]


def _ascii(text: str) -> str:
    # MRC labels are ASCII text (mrcfile refuses anything else)
    return text.encode("ascii", "backslashreplace").decode("ascii")
