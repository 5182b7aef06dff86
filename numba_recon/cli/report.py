"""Write (or rewrite) the self-contained HTML report of a run folder.

\b
Example:
  numba-recon report recon            # writes recon/report.html
"""

from __future__ import annotations

from pathlib import Path

import click

from numba_recon.cli._common import handle_errors
from numba_recon.errors import InputError


@click.command("report", help=__doc__)
@click.argument("run_dir", type=click.Path(file_okay=False))
@handle_errors
def report(run_dir: str) -> None:
    from numba_recon.report import write_html_report

    out = Path(run_dir)
    if not out.is_dir():
        raise InputError("no such run folder", out, "give the -o folder of a numba-recon run")
    if not (out / "summary.json").is_file():
        raise InputError("not a finished run folder (no summary.json)", out,
                         "run `numba-recon run ... -o FOLDER` first, or resume it with --resume")
    path = write_html_report(out)
    click.echo(f"Report: {path}")
