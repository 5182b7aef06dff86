"""The parameter types of the command line, the options that use them, where the choices come from,
and the run configuration's independence of the loss and symmetry modules.

Every bad value is refused while the command line is parsed: one ``numba-recon: error:`` line,
exit status 2, naming the option, the value and the valid range. Good values pass the parser and
the command goes on to its next check, which here is a missing input file (or an output that
exists), so nothing runs. Budget: a few seconds (no reconstruction, no simulation).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest

from numba_recon.cli import COMMANDS, main
from numba_recon.cli import _common as common

ERROR_PREFIX = "numba-recon: error: "
ROOT = Path(__file__).resolve().parent.parent


def _command(name: str) -> click.Command:
    module, attr, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), attr)


def _param(command: str, option: str) -> click.Parameter:
    for param in _command(command).params:
        if option in param.opts:
            return param
    raise KeyError(f"{command} has no {option}")


# command -> arguments that pass the parser and then stop at a missing input (or an existing output)
# before any work: a value the parser accepts ends there, never in a message about the option
BASE = {
    "run": ["run", "{tmp}/missing.star", "-o", "{tmp}/out", "--backend", "cpu"],
    "demo": ["demo", "-o", "{tmp}/afile"],
    "simulate": ["simulate", "-o", "{tmp}/afile", "--n-particles", "8", "--box-size", "16"],
    "fsc": ["fsc", "{tmp}/missing1.mrc", "{tmp}/missing2.mrc"],
    "mask": ["mask", "{tmp}/missing.mrc", "-o", "{tmp}/mask.mrc", "--threshold", "auto"],
    "lowpass": ["lowpass", "{tmp}/missing.mrc", "-o", "{tmp}/lp.mrc", "--resolution", "8"],
    "postprocess": ["postprocess", "{tmp}/missing1.mrc", "{tmp}/missing2.mrc", "-o", "{tmp}/post"],
    "locres": ["locres", "{tmp}/missing1.mrc", "{tmp}/missing2.mrc", "--mask", "{tmp}/m.mrc", "-o", "{tmp}/lr"],
    "select": ["select", "{tmp}/missing.star", "-o", "{tmp}/clean.star"],
    "project": ["project", "{tmp}/missing.mrc", "--star", "{tmp}/missing.star", "-o", "{tmp}/model.mrcs"],
    "convert": ["convert", "{tmp}/missing.star", "{tmp}/out.thu"],
    "info": ["info", "{tmp}/missing.star"],
    "bench": ["bench", "--backend", "cpu", "--json", "{tmp}/afile"],
}


def _invoke(runner, tmp_path: Path, command: str, *extra: str):
    (tmp_path / "afile").write_text("exists\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in BASE[command]]
    if command == "select" and "--keep-fraction" not in extra and "--max-score" not in extra:
        args.append("--kept")  # select wants exactly one criterion
    return runner.invoke(main, [*args, *extra])


def _error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "Usage:" not in result.stderr, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
    return lines[0]


def assert_refused(result, option: str, value: str, *fragments: str) -> str:
    """One line, exit 2, naming the option first, then the value and ``fragments`` (the range)."""
    line = _error_line(result)
    assert line.startswith(f"{ERROR_PREFIX}{option} "), line
    assert value.strip() in line, (value, line)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def assert_accepted(result, option: str) -> None:
    """The parser took the value: the command stopped later, for a reason other than the option."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert not line.startswith(f"{ERROR_PREFIX}{option} "), line
    assert "Invalid value" not in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------
# each type: good and bad values, through one option of a command
# --------------------------------------------------------------------------------------------

# type, (command, option), good values, bad values -> what the message must show of the range
TYPES = [
    (common.PIXEL_SIZE, ("fsc", "--angpix"), ["1.06", "0.5", "1e-3", "4"],
     ["nan", "inf", "-inf", "-1.5", "0", "abc", ""], ["> 0", "give the pixel size in Angstrom"]),
    (common.RESOLUTION_ANGSTROM, ("lowpass", "--resolution"), ["8", "3.5", "1e3"],
     ["nan", "inf", "-4", "0", "eight"], ["positive resolution in Angstrom"]),
    (common.POSITIVE_FLOAT, ("run", "--lr"), ["0.2", "1e-6", "10"],
     ["nan", "inf", "-0.1", "0", "fast"], ["> 0"]),
    (common.NONNEGATIVE_FLOAT, ("run", "--cache-mb"), ["0", "2048", "0.5"],
     ["nan", "inf", "-1", "lots"], [">= 0"]),
    (common.FINITE_FLOAT, ("mask", "--extend"), ["-3", "0", "2.5"],
     ["nan", "inf", "-inf", "x"], ["finite number"]),
    (common.POSITIVE_INT, ("run", "--epochs"), ["1", "3", "+2"],
     ["0", "-2", "1.5", "nan", "inf", "two"], [">= 1"]),
    (common.NONNEGATIVE_INT, ("run", "--robust-warmup"), ["0", "2"],
     ["-1", "0.5", "nan", "x"], [">= 0"]),
    (common.FRACTION, ("select", "--keep-fraction"), ["1", "0.7", "1e-3"],
     ["0", "-0.1", "1.01", "nan", "inf", "most"], ["(0, 1]"]),
    (common.FSC_VALUE, ("locres", "--fsc-threshold"), ["0.143", "0.5"],
     ["0", "1", "-0.5", "nan", "inf", "x"], ["(0, 1)"]),
    (common.SEED, ("run", "--seed"), ["0", "42", str(2**63 - 1)],
     ["-1", str(2**63), "1.5", "nan", "x"], ["from 0 to"]),
]


def _cases(good: bool):
    for ptype, (command, option), ok, bad, _ in TYPES:
        for value in (ok if good else bad):
            yield pytest.param(command, option, value, id=f"{ptype.requirement[:24]}-{command}{option}={value}")


@pytest.mark.parametrize("command, option, value", list(_cases(good=True)))
def test_types_accept_good_values(runner, tmp_path, command, option, value):
    assert_accepted(_invoke(runner, tmp_path, command, option, value), option)


@pytest.mark.parametrize("command, option, value", list(_cases(good=False)))
def test_types_refuse_bad_values_in_one_line_naming_the_option(runner, tmp_path, command, option, value):
    fragments = next(f for _, (c, o), _, _, f in TYPES if (c, o) == (command, option))
    result = _invoke(runner, tmp_path, command, option, value)
    assert_refused(result, option, repr(value) if value == "" else value, *fragments)
    assert not (tmp_path / "out").exists()


def test_each_type_is_tested():
    tested = {id(t) for t, *_ in TYPES}
    public = [v for k, v in vars(common).items() if k.isupper() and isinstance(v, common.FiniteNumber)]
    assert {id(t) for t in public} <= tested


def test_the_types_also_give_python_callers_an_input_error():
    from numba_recon.errors import InputError

    with pytest.raises(InputError, match="--angpix must be a finite number of Angstrom > 0 .got nan"):
        common.check_angpix(float("nan"))
    common.check_angpix(None)
    common.check_angpix(1.06)
    assert common.POSITIVE_INT.check("--epochs", "3") == 3


# --------------------------------------------------------------------------------------------
# where the types are used: every option with such a rule has its type
# --------------------------------------------------------------------------------------------

USES = [
    *[(c, "--angpix", common.PIXEL_SIZE) for c in
      ("run", "demo", "simulate", "fsc", "mask", "lowpass", "postprocess", "locres", "select", "project", "convert",
       "info")],
    *[(c, "--seed", common.SEED) for c in ("run", "demo", "simulate", "postprocess", "locres", "convert")],
    ("run", "--epochs", common.POSITIVE_INT), ("run", "--batch-size", common.POSITIVE_INT),
    ("run", "--checkpoint-every", common.POSITIVE_INT), ("run", "--keep-checkpoints", common.POSITIVE_INT),
    ("run", "--threads", common.POSITIVE_INT), ("run", "--robust-warmup", common.NONNEGATIVE_INT),
    ("run", "--lr", common.POSITIVE_FLOAT), ("run", "--reweight-power", common.POSITIVE_FLOAT),
    ("run", "--particle-diameter", common.POSITIVE_FLOAT), ("run", "--radius", common.POSITIVE_FLOAT),
    ("run", "--reg-lambda", common.NONNEGATIVE_FLOAT), ("run", "--cache-mb", common.NONNEGATIVE_FLOAT),
    ("run", "--initial-lowpass", common.RESOLUTION_ANGSTROM),
    ("demo", "--particles", common.POSITIVE_INT), ("demo", "--box-size", common.POSITIVE_INT),
    ("demo", "--epochs", common.POSITIVE_INT),
    ("simulate", "--n-particles", common.POSITIVE_INT), ("simulate", "--box-size", common.POSITIVE_INT),
    ("simulate", "--particles-per-stack", common.POSITIVE_INT), ("simulate", "--snr", common.POSITIVE_FLOAT),
    ("simulate", "--defocus-min", common.POSITIVE_FLOAT), ("simulate", "--defocus-max", common.POSITIVE_FLOAT),
    ("simulate", "--voltage", common.POSITIVE_FLOAT), ("simulate", "--astigmatism", common.NONNEGATIVE_FLOAT),
    ("simulate", "--cs", common.NONNEGATIVE_FLOAT), ("simulate", "--max-shift", common.NONNEGATIVE_FLOAT),
    ("mask", "--extend", common.FINITE_FLOAT), ("mask", "--soft-edge", common.NONNEGATIVE_FLOAT),
    ("mask", "--lowpass", common.RESOLUTION_ANGSTROM),
    ("lowpass", "--resolution", common.RESOLUTION_ANGSTROM), ("lowpass", "--edge-width", common.NONNEGATIVE_INT),
    ("postprocess", "--bfactor", common.FINITE_FLOAT), ("postprocess", "--lowpass", common.RESOLUTION_ANGSTROM),
    ("postprocess", "--autob-lowres", common.RESOLUTION_ANGSTROM),
    ("postprocess", "--autob-highres", common.NONNEGATIVE_FLOAT),
    ("postprocess", "--randomize-at-fsc", common.FSC_VALUE),
    ("locres", "--window-angstrom", common.POSITIVE_FLOAT), ("locres", "--sampling-angstrom", common.POSITIVE_FLOAT),
    ("locres", "--window-edge-angstrom", common.NONNEGATIVE_FLOAT),
    ("locres", "--randomize-at-angstrom", common.NONNEGATIVE_FLOAT), ("locres", "--fsc-threshold", common.FSC_VALUE),
    ("select", "--keep-fraction", common.FRACTION), ("select", "--max-score", common.FINITE_FLOAT),
    ("project", "--first", common.POSITIVE_INT),
    ("bench", "--repeats", common.POSITIVE_INT), ("bench", "--threads", common.POSITIVE_INT),
]


@pytest.mark.parametrize("command, option, ptype", USES, ids=[f"{c}{o}" for c, o, _ in USES])
def test_options_use_their_type(runner, tmp_path, command, option, ptype):
    assert _param(command, option).type is ptype
    bad = "-1" if ptype.integer else "nan"
    assert_refused(_invoke(runner, tmp_path, command, option, bad), option, bad)


@pytest.mark.parametrize("command, option, bad, fragment", [
    ("run", "--cv-fraction", "0.5", "[0, 0.5)"),
    ("run", "--cv-fraction", "nan", "[0, 0.5)"),
    ("run", "--keep-fraction", "0:0.5", "(0, 1]"),
    ("run", "--keep-fraction", "0.2:0.3:0.4", "3 parts"),
    ("run", "--keep-fraction", "half", "START:END"),
    ("simulate", "--junk-fraction", "1", "[0, 1)"),
    ("simulate", "--amplitude-contrast", "-0.1", "[0, 1)"),
    ("mask", "--threshold", "inf", "auto"),
    ("bench", "--box", "64,0", "positive integers"),
    ("bench", "--batch", "a,b", "positive integers"),
])
def test_option_specific_types(runner, tmp_path, command, option, bad, fragment):
    # an option given twice takes the last value: this one, after the base arguments' own
    assert_refused(_invoke(runner, tmp_path, command, option, bad), option, bad, fragment)


@pytest.mark.parametrize("value, expected", [("auto", (None, None)), ("0.7", (0.7, 0.7)), ("0.5:0.8", (0.5, 0.8)),
                                             (" AUTO ", (None, None)), ("1", (1.0, 1.0))])
def test_keep_fraction_values(value, expected):
    from numba_recon.cli.run import KeepFraction

    assert KeepFraction().convert(value, None, None) == expected


def test_mask_threshold_auto_and_numbers():
    from numba_recon.cli.mask import ThresholdType

    assert ThresholdType().convert("auto", None, None) == "auto"
    assert ThresholdType().convert("-0.02", None, None) == -0.02


# --------------------------------------------------------------------------------------------
# choices come from the modules that own them
# --------------------------------------------------------------------------------------------

def test_choices_come_from_their_modules():
    from numba_recon import backend, config, loss

    for command in ("run", "demo", "project"):
        assert tuple(_param(command, "--backend").type.choices) == backend.CHOICES
    assert tuple(_param("bench", "--backend").type.choices) == (*(b for b in backend.CHOICES if b != "auto"), "all")
    assert tuple(_param("run", "--optimizer").type.choices) == config.OPTIMIZERS
    assert tuple(_param("run", "--prepare-on").type.choices) == config.PREPARE_ON
    assert tuple(_param("run", "--loss").type.choices) == loss.LOSS_NAMES
    assert {loss.canonical_loss(name) for name in loss.LOSS_NAMES} == set(loss.LOSSES)
    assert loss.LOSSES is config.LOSSES and loss.canonical_loss is config.canonical_loss


def test_a_choice_outside_the_list_is_one_line(runner, tmp_path):
    line = _error_line(_invoke(runner, tmp_path, "run", "--loss", "huber"))
    assert "--loss" in line and "huber" in line and "reweighted" in line


# --------------------------------------------------------------------------------------------
# run: options map onto named RunConfig fields
# --------------------------------------------------------------------------------------------

def test_every_run_setting_is_an_option_of_the_same_name():
    from numba_recon.cli.run import RESUME_SAFE_OPTIONS
    from numba_recon.config import RunConfig

    names = {p.name for p in _command("run").params}
    settings = {f.name for f in fields(RunConfig)} - {"particles", "out_dir", "keep_start", "keep_end"}
    assert settings <= names, settings - names
    assert set(RESUME_SAFE_OPTIONS) <= settings
    assert names - settings == {"particles", "out_dir", "resume_dir", "overwrite", "keep_fraction", "threads"}


def test_run_option_types_agree_with_run_config():
    """RunConfig keeps its own checks (checkpoints, Python callers); for every typed option of run
    it accepts and refuses exactly what the option's type does."""
    from numba_recon.config import RunConfig
    from numba_recon.errors import InputError

    floats = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e-9, 0.25, 0.4999, 0.5, 1.0, 2.0, 1e6]
    ints = [-1, 0, 1, 2, 2**63 - 1, 2**63]
    checked = 0
    for param in _command("run").params:
        if not isinstance(param.type, common.FiniteNumber) or param.name == "threads":
            continue
        checked += 1
        for value in ints if param.type.integer else floats:
            by_type = param.type.parse(value)[1] is None
            try:
                RunConfig(particles="p.star", out_dir="o", **{param.name: value})
                by_config = True
            except InputError:
                by_config = False
            assert by_type == by_config, (param.name, value, by_type, by_config)
    assert checked >= 15


# --------------------------------------------------------------------------------------------
# config does not reach up to the loss or symmetry modules
# --------------------------------------------------------------------------------------------

def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_config_imports_neither_loss_nor_symmetry():
    imported = _imported_modules(ROOT / "numba_recon" / "config.py")
    heavy = ("numba_recon.loss", "numba_recon.symmetry.groups", "numba_recon.symmetry.subspace")
    for module in heavy:
        assert module not in imported, imported
    code = ("import sys, numba_recon.config\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_checks_loss_and_symmetry_as_before():
    from numba_recon.config import RunConfig
    from numba_recon.errors import InputError

    assert RunConfig(particles="p.star", out_dir="o", loss="sorted").loss == "trimmed"
    assert RunConfig(particles="p.star", out_dir="o", loss=" L2 ").loss == "l2"
    assert RunConfig(particles="p.star", out_dir="o", symmetry="d7").symmetry == "d7"  # kept as given
    with pytest.raises(InputError, match=r"^--loss unknown loss 'huber'; choose one of l2, trimmed \(sorted\), "
                                         r"reweighted; choose l2, trimmed or reweighted$"):
        RunConfig(particles="p.star", out_dir="o", loss="huber")
    with pytest.raises(InputError, match="unknown symmetry group 'X9'"):
        RunConfig(particles="p.star", out_dir="o", symmetry="X9")


NAMES = ["C1", "c7", " d7 ", "D36", "C361", "D0", "C0", "I", "i3", "I5", "T", "O", "o2", "X9", "", "C 7", "C-3",
         "C1.5", "C007"]


@pytest.mark.parametrize("name", NAMES)
def test_symmetry_name_parser_agrees_with_the_operators(name):
    """The parse-only check accepts what the operator builder accepts (naming the same group) and
    refuses the rest with the same message."""
    import numpy as np

    from numba_recon.errors import InputError
    from numba_recon.symmetry.groups import symmetry_operators
    from numba_recon.symmetry.names import parse_symmetry_name

    try:
        operators = symmetry_operators(name)
    except InputError as err:
        with pytest.raises(InputError) as got:
            parse_symmetry_name(name)
        assert str(got.value) == str(err)
    else:
        np.testing.assert_array_equal(symmetry_operators(parse_symmetry_name(name)), operators)


# --------------------------------------------------------------------------------------------
# shared helpers live in _common
# --------------------------------------------------------------------------------------------

def test_map_commands_take_the_map_readers_from_common():
    for name in ("fsc", "locres", "lowpass", "mask", "postprocess"):
        source = (ROOT / "numba_recon" / "cli" / f"{name}.py").read_text()
        assert "numba_recon.cli.fsc" not in source, name
        assert "def read_map" not in source and "def check_angpix" not in source, name
    for helper in ("check_angpix", "read_map", "read_map_pair", "read_mask"):
        assert callable(getattr(common, helper))
