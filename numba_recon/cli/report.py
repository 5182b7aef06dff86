"""Write (or rewrite) the self-contained HTML report of a finished run folder.

The plots are redrawn from the folder's files (fsc.csv, history.csv, run_class001.mrc, run_data.star,
run_data_scores.csv; postprocess/ when the run had --mask), then embedded in OUTDIR/report.html: one
page that opens in any browser, offline, and can be mailed or archived as a single file. It shows
the resolution, the FSC curves, the loss and resolution history, slices through the box centre and
the centre of mass, projections, the distribution of viewing directions, per-particle scores, the
symmetry, the command line and the versions. OUTDIR/run.cxc is rewritten too: `chimerax
OUTDIR/run.cxc` shows the map at a suggested contour level, coloured by local resolution when
OUTDIR/locres/locres.mrc exists (from `numba-recon locres ... -o OUTDIR/locres`).

With a known true map (simulated data: truth.mrc beside the run's particles file is found by itself,
or --truth), the FSC of the map against it is drawn with the half-map FSC and its resolution at 0.5
joins the summary table.

\b
Examples:
  numba-recon report recon                        # writes recon/report.html and recon/run.cxc
  numba-recon report recon --truth data/truth.mrc
"""

from __future__ import annotations

from pathlib import Path

import click

from numba_recon.cli._common import handle_errors
from numba_recon.errors import InputError
from numba_recon.io.run_files import CHIMERAX_CXC, MAP, SUMMARY_JSON


@click.command("report", help=__doc__)
@click.argument("run_dir", metavar="OUTDIR", type=click.Path(file_okay=False))
@click.option("--truth", "truth", type=click.Path(dir_okay=False), default=None,
              help="True map (same box and voxel size) to compare the map with, e.g. the truth.mrc of "
                   "`numba-recon simulate` [default: truth.mrc beside the run's particles file, when it fits].")
@handle_errors
def report(run_dir: str, truth: str | None) -> None:
    from numba_recon.report.chimerax import write_chimerax_script
    from numba_recon.report.page import write_html_report
    from numba_recon.report.plots import make_plots

    out = Path(run_dir)
    if not out.is_dir():
        raise InputError("no such run folder", out, "give the -o folder of a numba-recon run")
    if not (out / SUMMARY_JSON).is_file():
        raise InputError("not a finished run folder (no summary.json)", out,
                         "run `numba-recon run ... -o FOLDER` first, or resume it with --resume")
    from numba_recon import manifest

    # the plots and the page belong to the run: its manifest lists them, so --overwrite replaces them
    manifest.start(out, "run", resume=True)
    from numba_recon.journal import append_note

    append_note(out)  # the folder's history: every command that touched it
    try:
        make_plots(out, truth=truth)
        if (out / MAP).is_file():
            import json

            summary = json.loads((out / SUMMARY_JSON).read_text())
            write_chimerax_script(out, resolution_angstrom=summary.get("resolution_angstrom"))
    except InputError:
        raise
    except (KeyError, ValueError) as err:
        raise InputError(f"cannot read the run's files ({err})", out,
                         "check that the folder holds a complete numba-recon run") from None
    path = write_html_report(out)
    click.echo(f"Report: {path}")
    if (out / CHIMERAX_CXC).is_file():
        click.echo(f"ChimeraX: chimerax {out / 'run.cxc'}")
