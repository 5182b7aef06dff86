"""The records a run folder keeps of itself: ``note.txt`` (every command that touched the folder,
appended, as RELION keeps it) and ``run.log`` (what the terminal showed, appended, more with ``-v``).

Both only ever grow: ``--overwrite`` and ``--resume`` append to them, so the folder's history stays
readable (:data:`numba_recon.manifest.JOURNALS` keeps them out of what ``--overwrite`` removes).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

from numba_recon import __version__

NOTE_NAME = "note.txt"
LOG_NAME = "run.log"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``numba-recon`` and its arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["numba-recon", *args])


def append_note(folder: str | os.PathLike, argv: list[str] | None = None) -> Path:
    """Append the running command to ``folder/note.txt`` with the time, the version and the working
    directory (RELION's ``note.txt`` habit)."""
    path = Path(folder) / NOTE_NAME
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(f" ++++ {stamp}  numba-recon {__version__}  in {os.getcwd()}\n{command_line(argv)}\n")
    return path


def attach_log(folder: str | os.PathLike, verbosity: int = 0) -> logging.Handler:
    """Copy the log into ``folder/run.log`` (appended): INFO and above, DEBUG with ``-v``, whatever
    ``-q`` hides on the terminal. Returns the handler (remove it with :func:`detach_log`)."""
    handler = logging.FileHandler(Path(folder) / LOG_NAME, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    # the terminal's level stays on its own handler; the logger lets INFO (DEBUG with -v) through
    if root.level > handler.level or root.level == logging.NOTSET:
        for h in root.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(root.level)
        root.setLevel(handler.level)
    handler.stream.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}  {command_line()}\n")
    handler.flush()
    return handler


def detach_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
