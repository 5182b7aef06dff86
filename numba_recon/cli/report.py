"""Write (or rewrite) the self-contained HTML report of a finished run folder.

The plots are redrawn from the folder's files (fsc.csv, history.csv, run_class001.mrc, run_data.star;
postprocess/ when the run had --mask), then embedded in OUTDIR/report.html: one page that opens in any
browser, offline, and can be mailed or archived as a single file. It shows the resolution, the FSC
curves, the loss and resolution history, central slices, projections, per-particle scores (robust
losses), the symmetry, the command line and the versions.

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
@click.argument("run_dir", metavar="OUTDIR", type=click.Path(file_okay=False))
@handle_errors
def report(run_dir: str) -> None:
    from numba_recon.report import make_plots, write_html_report

    out = Path(run_dir)
    if not out.is_dir():
        raise InputError("no such run folder", out, "give the -o folder of a numba-recon run")
    if not (out / "summary.json").is_file():
        raise InputError("not a finished run folder (no summary.json)", out,
                         "run `numba-recon run ... -o FOLDER` first, or resume it with --resume")
    from numba_recon import manifest

    # the plots and the page belong to the run: its manifest lists them, so --overwrite replaces them
    manifest.start(out, "run", resume=True)
    try:
        make_plots(out)
    except InputError:
        raise
    except (KeyError, ValueError) as err:
        raise InputError(f"cannot read the run's files ({err})", out,
                         "check that the folder holds a complete numba-recon run") from None
    path = write_html_report(out)
    click.echo(f"Report: {path}")
