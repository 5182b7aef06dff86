"""The project's exception types.

Everything a user can cause with a bad file or a bad option raises :class:`InputError` (or a
subclass); the command line turns it into one line on stderr and exit status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import os


class NumbaReconError(Exception):
    """Base class of the project's errors."""


class InputError(NumbaReconError, ValueError):
    """Bad user input: a file or an option. The CLI prints ``str(err)`` and exits with status 2.

    Parameters
    ----------
    message
        What is wrong, in one sentence.
    path
        The offending file, if any; it is named first in the message.
    fix
        How to fix it, appended after the problem.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None, fix: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        self.fix = fix
        text = message
        if self.path is not None:
            text = f"{self.path}: {message}"
        if fix:
            text = f"{text}; {fix}"
        super().__init__(text)


class InputFileError(InputError):
    """A file that cannot be read or does not make sense."""


class OutputError(InputError):
    """An output location that cannot be written (exists without --overwrite, not writable, disk full)."""


class BackendUnavailableError(NumbaReconError, RuntimeError):
    """The requested compute backend cannot run here; the message says what is missing."""

    exit_code = 2
