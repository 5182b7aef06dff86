"""The names of the files and folders a run folder holds: the one table that ``run``, ``demo``,
``report``, the figures, the page and the output manifest read.

Names follow RELION's ``relion_refine`` outputs where RELION has one, so existing scripts and GUIs
find them (docs/reconstruction.md, "Outputs").
"""

from __future__ import annotations

HALF1_MAP = "run_half1_class001_unfil.mrc"
HALF2_MAP = "run_half2_class001_unfil.mrc"
#: the average of the half maps, FSC-weighted and low-pass filtered at the resolution
MAP = "run_class001.mrc"
MODEL_STAR = "run_model.star"
DATA_STAR = "run_data.star"
#: the per-particle scores, weights and flags, keyed by image name
SCORES_CSV = "run_data_scores.csv"
FSC_CSV = "fsc.csv"
#: with a known true map (simulated data): the FSC of the map against it
FSC_TRUTH_CSV = "fsc_truth.csv"
HISTORY_CSV = "history.csv"
HALF_SETS_CSV = "half_sets.csv"
SUMMARY_JSON = "summary.json"
COMMAND_TXT = "command.txt"
REPORT_HTML = "report.html"
CHIMERAX_CXC = "run.cxc"
PLOTS_DIR = "plots"
#: the figures under ``plots/``, in the order the page shows them
PLOT_FILES = ("fsc.png", "loss.png", "slices.png", "projections.png", "directions.png", "scores.png")
POSTPROCESS_DIR = "postprocess"
CHECKPOINTS_DIR = "checkpoints"
#: the file in ``checkpoints/`` that names the newest checkpoint
LATEST_CHECKPOINT_JSON = "latest.json"
#: RELION's marker of a finished job
SUCCESS_MARKER = "NUMBA_RECON_JOB_EXIT_SUCCESS"
#: every file a run writes at the top of its folder (the output manifest and ``--overwrite`` read it)
RUN_OUTPUT_FILES = (HALF1_MAP, HALF2_MAP, MAP, MODEL_STAR, DATA_STAR, FSC_CSV, HISTORY_CSV, HALF_SETS_CSV, SUMMARY_JSON,
                    COMMAND_TXT, REPORT_HTML, CHIMERAX_CXC, FSC_TRUTH_CSV, SCORES_CSV, SUCCESS_MARKER)
#: the folders a run writes into (``--overwrite`` removes only what the output manifest lists as
#: written by the previous run: docs/outputs-and-overwrite.md)
RUN_OUTPUT_FOLDERS = (CHECKPOINTS_DIR, PLOTS_DIR, POSTPROCESS_DIR)
