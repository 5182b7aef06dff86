"""What the benchmark scripts share: where they work, the simulated data set they start from, and
the child process that runs ``numba-recon`` and reports what it measured.

The scripts run as ``python benchmarks/NAME.py`` (from the repository root or anywhere else), so
their folder is on ``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path


def add_workdir_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workdir``: the folder to ``what`` in, kept; without it, a temporary folder, removed."""
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"where to {what} (default: a temporary folder, removed)")


@contextlib.contextmanager
def work_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given`` (kept, with whatever was written into it); without it, a new temporary folder named
    ``PREFIX...``, removed when the block ends, however it ends."""
    if given is not None:
        yield given
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in_work_folder(parser: argparse.ArgumentParser, prefix: str,
                       run: Callable[[argparse.Namespace, Path], None]) -> None:
    """Parse the command line (``parser`` has ``--workdir``: :func:`add_workdir_option`), then
    ``run(args, work)`` in that folder or in a temporary one (:func:`work_folder`)."""
    args = parser.parse_args()
    with work_folder(args.workdir, prefix) as work:
        run(args, work)


def simulated(folder: Path, **options) -> Path:
    """The STAR file of ``simulate_dataset(folder, **options)``, simulated only when ``folder`` holds
    no ``particles.star`` yet (a ``--workdir`` of an earlier run keeps its data set)."""
    from numba_recon.sim.simulate import simulate_dataset

    if not (folder / "particles.star").exists():
        simulate_dataset(folder, overwrite=True, **options)
    return folder / "particles.star"


_CHILD = r"""
import json, os, sys, time
SETUP
from numba_recon.cli import main
t0 = time.perf_counter()
status = 0
try:
    main(sys.argv[1:], prog_name="numba-recon", standalone_mode=False)
except SystemExit as err:
    status = err.code or 0
finally:
    report = {"status": status, "wall_s": time.perf_counter() - t0}
    FINISH
    print("MEASURE " + json.dumps(report), file=sys.stderr)
"""


def measured_child(setup: str = "", finish: str = "") -> str:
    """The code of a child process, ``python -c CODE ARGS``, that runs ``numba-recon ARGS`` in-process
    after ``setup`` and prints one line ``MEASURE {json}`` on stderr: the command's exit status and
    wall time (interpreter start and ``setup`` excluded), and what ``finish``, run however the
    command ended, adds to the dict ``report``. :func:`measured_report` reads that line."""
    return (_CHILD.replace("SETUP", textwrap.dedent(setup).strip("\n"))
            .replace("    FINISH\n", textwrap.indent(textwrap.dedent(finish).lstrip("\n"), "    ")))


def measured_report(output: str) -> dict | None:
    """The report of the last ``MEASURE`` line of a :func:`measured_child`'s output; None without one."""
    lines = [line for line in output.splitlines() if line.startswith("MEASURE ")]
    return json.loads(lines[-1][len("MEASURE "):]) if lines else None
