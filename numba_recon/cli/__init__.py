"""The ``numba-recon`` command group.

Each subcommand lives in its own module under ``numba_recon/cli/`` and is imported only when it is
run, so ``numba-recon --help`` and ``--version`` start instantly.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from typing import Any

import click

from numba_recon import __version__

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("numba_recon.cli.demo", "demo", "Simulate a small D7 data set, reconstruct it and report."),
    "run": ("numba_recon.cli.run", "run", "Reconstruct half maps from particles with known poses."),
    "simulate": ("numba_recon.cli.simulate", "simulate", "Simulate a particle data set with known truth."),
    "info": ("numba_recon.cli.info", "info", "Summarise a STAR, .thu or MRC file."),
    "convert": ("numba_recon.cli.convert", "convert", "Convert particle metadata between .star and .thu."),
    "select": ("numba_recon.cli.select", "select", "Keep the best-scoring particles of a run_data.star."),
    "bench": ("numba_recon.cli.bench", "bench", "Benchmark the projection kernels."),
    "fsc": ("numba_recon.cli.fsc", "fsc", "Fourier shell correlation of two maps."),
    "mask": ("numba_recon.cli.mask", "mask", "Create a soft-edged mask from a map."),
    "postprocess": ("numba_recon.cli.postprocess", "postprocess", "Masked FSC, B-factor sharpening, low-pass."),
    "lowpass": ("numba_recon.cli.lowpass", "lowpass", "Low-pass filter a map."),
    "locres": ("numba_recon.cli.locres", "locres", "Local resolution from windowed half-map FSCs."),
    "project": ("numba_recon.cli.project", "project", "Project a map at the poses of a STAR file."),
    "report": ("numba_recon.cli.report", "report", "Write the HTML report of a run folder."),
}


_VERBOSITY = re.compile(r"^(-[vq]+|--verbose|--quiet)$")


def hoist_verbosity(args: list[str]) -> list[str]:
    """Move ``-v``/``-q`` (and ``-vv``, ``--verbose``, ``--quiet``) given after the subcommand to
    before it, so ``numba-recon run ... -q`` works like ``numba-recon -q run ...``; nothing after
    ``--`` is touched."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if _VERBOSITY.match(a)]
    if not flags:
        return args
    rest = [a for a in args[:end] if not _VERBOSITY.match(a)]
    return flags + rest + args[end:]


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name == module:
                return None
            raise

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """click's entry point, with click's own usage errors (an unknown option, a value click
        rejects, a folder where a file is expected) as the project's one line and exit status 2
        instead of a usage block, and Ctrl-C outside a run as one line and exit status 130."""
        args = hoist_verbosity(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `numba-recon`: the help, as click shows it
                err.show()
                sys.exit(err.exit_code)
            where = err.ctx.command_path if err.ctx is not None else "numba-recon"
            click.echo(f"numba-recon: error: {err.format_message().rstrip('.')}; see `{where} --help`", err=True)
            sys.exit(2)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("numba-recon: error: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def launch_rank() -> int:
    """This process's MPI rank as the launcher (mpirun, mpiexec, srun) sets it; 0 outside MPI."""
    import os

    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def configure_logging(verbosity: int) -> None:
    """Map ``-v``/``-q`` counts to a log level (default INFO) on stderr."""
    level = max(logging.DEBUG, min(logging.ERROR, logging.INFO - 10 * verbosity))
    if launch_rank() > 0:  # under MPI every rank says the same: rank 0 speaks, the others only on errors
        level = max(level, logging.ERROR)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("numba").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="numba-recon")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output and no progress bars (repeatable).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """numba-recon: cryo-EM reconstruction from particles with known poses."""
    configure_logging(verbose - quiet)
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbose - quiet
