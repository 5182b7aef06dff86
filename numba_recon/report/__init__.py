"""The report stage of a run folder: what a finished run writes and shows.

- :mod:`~numba_recon.report.outputs`: the maps, RELION's STAR files, the tables and
  ``summary.json`` of a finished run (``write_run_outputs``, rank 0);
- :mod:`~numba_recon.report.plots`: the figures under ``plots/`` (and ``make_plots``, which redraws
  them from a run folder's files for ``numba-recon report``);
- :mod:`~numba_recon.report.page`: ``report.html``;
- :mod:`~numba_recon.report.chimerax`: ``run.cxc``.

The file names are those of :mod:`numba_recon.io.run_files`.
"""
