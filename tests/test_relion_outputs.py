"""RELION-native outputs: image names as in the input, run_model.star in RELION's shape,
RELION labels only in run_data.star (scores beside it), and the version and command line in every
STAR, CSV and MRC output (docs/file-formats.md, docs/robustness.md)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from numba_recon import __version__
from numba_recon.cli import main
from numba_recon.errors import InputFileError
from numba_recon.io.relion_model import (estimated_resolution, overall_fourier_completeness, ssnr_from_fsc,
                                         write_model_star)
from numba_recon.io.star import (read_particle_scores, read_star, scores_path, write_particle_scores,
                                 write_star)

# Labels of RELION's metadata_label.h that run_data.star may carry here: those of the input
# (written by the simulator) plus rlnRandomSubset (EMDL_PARTICLE_RANDOM_SUBSET).
RELION_PARTICLE_LABELS = {
    "rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
    "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup", "rlnRandomSubset",
    "rlnClassNumber", "rlnOpticsGroupName", "rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage",
    "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
}


def _star_labels(path: Path) -> list[str]:
    return [line.split()[0][1:] for line in path.read_text().splitlines() if line.startswith("_")]


def _names(path: Path) -> list[str]:
    return starfile.read(path, always_dict=True)["particles"]["rlnImageName"].tolist()


def _resolves_from(project: Path, name: str) -> bool:
    return os.path.isfile(os.path.join(project, name.split("@", 1)[1]))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION project: stacks in Extract/job007/Movies, Refine3D/job010/run_data.star naming them
    relative to the project folder (as RELION writes them)."""
    from numba_recon.sim.simulate import simulate_dataset

    base = tmp_path_factory.mktemp("relion")
    sim = base / "sim"
    simulate_dataset(sim, n_particles=80, box_size=16, pixel_size_angstrom=4.0, snr=1.0, seed=3,
                     particles_per_stack=40, max_shift_px=1.0, overwrite=True)
    proj = base / "Project"
    (proj / "Extract" / "job007" / "Movies").mkdir(parents=True)
    (proj / "Refine3D" / "job010").mkdir(parents=True)
    text = (sim / "particles.star").read_text()
    for k in (1, 2):
        shutil.copy(sim / "Particles" / f"stack_{k:04d}.mrcs", proj / "Extract" / "job007" / "Movies" / f"mic{k}.mrcs")
        text = text.replace(f"Particles/stack_{k:04d}.mrcs", f"Extract/job007/Movies/mic{k}.mrcs")
    (proj / "Refine3D" / "job010" / "run_data.star").write_text(text)
    return proj


@pytest.fixture(scope="module")
def run_dir(project) -> Path:
    from click.testing import CliRunner

    out = project / "NumbaRecon" / "job001"
    args = ["-q", "run", str(project / "Refine3D" / "job010" / "run_data.star"), "--root", str(project),
            "-o", str(out), "--backend", "cpu", "--epochs", "1"]
    saved = sys.argv
    sys.argv = ["numba-recon", *args]  # what the outputs record as the command line
    try:
        res = CliRunner().invoke(main, args)
    finally:
        sys.argv = saved
    assert res.exit_code == 0, res.output
    return out


# --------------------------------------------------------------------------------------------
# 1. image names
# --------------------------------------------------------------------------------------------

def test_run_data_keeps_the_input_image_names(project, run_dir):
    given = _names(project / "Refine3D" / "job010" / "run_data.star")
    written = _names(run_dir / "run_data.star")
    assert written == given  # the input's text, unchanged (not ../../Extract/...)
    assert all(_resolves_from(project, name) for name in written)
    # read back with the same root, the particles are the same images
    a = read_star(project / "Refine3D" / "job010" / "run_data.star", root=project)
    b = read_star(run_dir / "run_data.star", root=project)
    np.testing.assert_array_equal(b.stack_paths, a.stack_paths)
    np.testing.assert_array_equal(b.stack_indices, a.stack_indices)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["image_name_root"] == str(project) and summary["outputs"]["scores"] == "run_data_scores.csv"


@pytest.mark.parametrize("how", [["--keep-fraction", "0.5"], ["--max-score", "0"], ["--kept", "--root", "{root}"]])
def test_select_writes_the_input_image_names(project, run_dir, runner, how):
    out = project / "Select" / how[0].lstrip("-") / "particles.star"
    args = [a.format(root=project) for a in how]
    res = runner.invoke(main, ["select", str(run_dir / "run_data.star"), "-o", str(out), "--overwrite", *args])
    assert res.exit_code == 0, res.output
    given = set(_names(project / "Refine3D" / "job010" / "run_data.star"))
    names = _names(out)
    assert names and set(names) <= given
    assert all(_resolves_from(project, name) for name in names)
    assert not [label for label in _star_labels(out) if label.startswith("rlnNumbaRecon")]
    assert len(read_star(out, root=project)) == len(names)


def test_rows_that_changed_image_are_written_relative_to_the_root(project, tmp_path):
    p = read_star(project / "Refine3D" / "job010" / "run_data.star", root=project).subset(np.array([3, 0, 41]))
    p.stack_indices = p.stack_indices.copy()
    p.stack_indices[1] = 5  # now another image: its old name no longer applies
    out = tmp_path / "elsewhere" / "subset.star"
    names = write_star(p, out, keep_input_names=True)
    assert names[0] == "000004@Extract/job007/Movies/mic1.mrcs"  # the input's text
    assert names[1] == "000006@Extract/job007/Movies/mic1.mrcs"  # rewritten, relative to the root
    assert names[2] == "000002@Extract/job007/Movies/mic2.mrcs"
    np.testing.assert_array_equal(read_star(out, root=project).stack_indices, p.stack_indices)
    # without keep_input_names (convert, the simulator): relative to the output file's folder
    plain = write_star(p, tmp_path / "plain.star")
    assert plain[0] == "000004@" + os.path.relpath(project / "Extract" / "job007" / "Movies" / "mic1.mrcs", tmp_path)


# --------------------------------------------------------------------------------------------
# 2. run_model.star
# --------------------------------------------------------------------------------------------

def test_run_model_star_has_relions_blocks_and_labels(project, run_dir):
    path = run_dir / "run_model.star"
    text = path.read_text()
    head = text.lstrip().splitlines()
    assert head[0] == f"# numba-recon {__version__}" and head[1].startswith("# command: ")
    assert "# version 30001" in text
    model = starfile.read(path, always_dict=True)
    assert list(model) == ["model_general", "model_classes", "model_class_1"]
    general = model["model_general"]
    assert isinstance(general, dict)  # key/value pairs, as RELION writes it (MDlog.setIsList(true))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert general["rlnReferenceDimensionality"] == 3
    assert general["rlnDataDimensionality"] == 2
    assert general["rlnOriginalImageSize"] == 16 and general["rlnCurrentImageSize"] == 16
    assert general["rlnCurrentResolution"] == pytest.approx(summary["resolution_angstrom"])
    assert general["rlnIsHelix"] == 0
    assert general["rlnPixelSize"] == pytest.approx(4.0)
    assert general["rlnNrClasses"] == 1 and general["rlnNrBodies"] == 1
    assert general["rlnTau2FudgeFactor"] == 1.0  # the default solver learns the prior with T = 1
    assert general["rlnOrientationalPriorMode"] == 0
    # labels whose values a reconstruction from given poses would have to invent are left out
    for absent in ("rlnPaddingFactor", "rlnNrGroups", "rlnNormCorrectionAverage", "rlnSigmaOffsetsAngst",
                   "rlnLogLikelihood", "rlnAveragePmax", "rlnFourierSpaceInterpolator"):
        assert absent not in general, absent
    classes = model["model_classes"]
    assert list(classes.columns) == ["rlnReferenceImage", "rlnClassDistribution", "rlnEstimatedResolution",
                                     "rlnOverallFourierCompleteness"]
    assert len(classes) == 1
    reference = classes["rlnReferenceImage"][0]
    assert reference == "NumbaRecon/job001/run_class001.mrc"  # opens from the project folder, as RELION's
    assert (project / reference).is_file()
    assert classes["rlnClassDistribution"][0] == 1.0
    assert 0.0 <= classes["rlnOverallFourierCompleteness"][0] <= 1.0
    spectra = model["model_class_1"]
    assert list(spectra.columns) == ["rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnSsnrMap",
                                     "rlnGoldStandardFsc", "rlnFourierCompleteness", "rlnReferenceTau2"]
    assert spectra["rlnSpectralIndex"].tolist() == list(range(9))
    np.testing.assert_allclose(spectra["rlnResolution"], np.arange(9) / 64.0)
    assert spectra["rlnAngstromResolution"][0] == 999.0 and spectra["rlnAngstromResolution"][4] == 16.0
    fsc = np.array([float(x) for x in pd.read_csv(run_dir / "fsc.csv", comment="#")["fsc"]])
    np.testing.assert_allclose(spectra["rlnGoldStandardFsc"], fsc, atol=1e-6)
    np.testing.assert_allclose(spectra["rlnSsnrMap"], ssnr_from_fsc(spectra["rlnGoldStandardFsc"]))
    assert ((spectra["rlnFourierCompleteness"] >= 0) & (spectra["rlnFourierCompleteness"] <= 1)).all()
    tau2 = spectra["rlnReferenceTau2"].to_numpy()
    assert np.isinf(tau2[0]) and (tau2[1:] > 0).all()  # no prior on the DC shell
    assert classes["rlnEstimatedResolution"][0] == pytest.approx(
        estimated_resolution(spectra["rlnSsnrMap"].to_numpy(), 16, 4.0))


def test_model_star_without_a_learned_prior_leaves_its_labels_out(tmp_path):
    fsc = np.array([1.0, 0.99, 0.9, 0.6, 0.45, 0.2, 0.05, -0.02, 0.01])
    path = write_model_star(tmp_path / "run_model.star", fsc, 16, 2.0, 9.1)
    model = starfile.read(path, always_dict=True)
    assert "rlnTau2FudgeFactor" not in model["model_general"]
    assert list(model["model_classes"].columns) == ["rlnReferenceImage", "rlnClassDistribution",
                                                    "rlnEstimatedResolution"]
    assert "rlnReferenceTau2" not in model["model_class_1"] and "rlnFourierCompleteness" not in model["model_class_1"]
    assert model["model_class_1"]["rlnSsnrMap"][7] == 0.0  # negative FSC: no signal
    # RELION: the last shell before SSNR (FSC / (1 - FSC)) drops below 1, i.e. before FSC < 0.5
    assert model["model_classes"]["rlnEstimatedResolution"][0] == pytest.approx(16 * 2.0 / 3)


def test_overall_completeness_is_relions_sum_over_the_cube():
    """``MlModel::calculateTotalFourierCoverage``, transcribed as three loops."""
    ssnr = np.array([1e6, 50.0, 20.0, 8.0, 3.0, 1.5, 0.7, 0.1, 0.0])
    completeness = np.array([1.0, 1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.1, 0.0])
    maxres = 5
    total, count = 0.0, 0
    half = maxres - 1  # coverwindow = 2 maxres - 1: indices -(maxres - 1) .. maxres - 1
    for k in range(-half, half + 1):
        for i in range(-half, half + 1):
            for j in range(-half, half + 1):
                r = int(math.sqrt(k * k + i * i + j * j))
                if r <= maxres:
                    total += completeness[r]
                    count += 1
    assert overall_fourier_completeness(ssnr, completeness) == pytest.approx(total / count, rel=1e-12)
    assert estimated_resolution(ssnr, 16, 2.0) == pytest.approx(32.0 / 5)
    assert overall_fourier_completeness(np.zeros(9), completeness) == 0.0


# --------------------------------------------------------------------------------------------
# 3. RELION labels only in run_data.star; scores beside it
# --------------------------------------------------------------------------------------------

def test_run_data_has_relion_labels_and_the_scores_sit_beside_it(run_dir):
    labels = _star_labels(run_dir / "run_data.star")
    assert set(labels) <= RELION_PARTICLE_LABELS, set(labels) - RELION_PARTICLE_LABELS
    assert "rlnRandomSubset" in labels  # the half sets the run used
    table = pd.read_csv(run_dir / "run_data_scores.csv", comment="#")
    assert list(table.columns) == ["image_name", "loss", "score", "weight", "kept", "half_set", "cross_validation"]
    blocks = starfile.read(run_dir / "run_data.star", always_dict=True)["particles"]
    assert table["image_name"].tolist() == blocks["rlnImageName"].tolist()
    np.testing.assert_array_equal(table["half_set"], blocks["rlnRandomSubset"])
    assert np.isfinite(table["score"]).all() and set(table["kept"]) <= {0, 1}
    split = pd.read_csv(run_dir / "half_sets.csv", comment="#")
    np.testing.assert_array_equal(split["cross_validation"], table["cross_validation"])


def test_scores_are_found_by_image_name_after_rows_are_reordered(tmp_path, data_dir):
    p = read_star(data_dir / "relion31.star")
    star = tmp_path / "run_data.star"
    names = write_star(p, star, keep_input_names=True)
    write_particle_scores(scores_path(star), names, {"score": np.arange(len(p)) / 10.0,
                                                      "kept": np.array([1, 0, 1, 1, 0])})
    # a RELION subset of the file, saved under the same name, in another order
    sub = p.subset(np.array([4, 2, 0]))
    write_star(sub, star, keep_input_names=True)
    back = read_star(star, root=data_dir)
    found = read_particle_scores(star, back.table)
    np.testing.assert_allclose(found["score"], [0.4, 0.2, 0.0])
    assert found["kept"].tolist() == [0, 1, 1]
    # a score table that lacks an image of the file would attach scores to the wrong particles
    write_particle_scores(scores_path(star), names[:2], {"score": np.zeros(2)})
    with pytest.raises(InputFileError, match="has no row for image"):
        read_particle_scores(star, back.table)


def test_select_still_reads_run_data_with_score_columns(tmp_path, runner, data_dir):
    """A run_data.star from before the score table: the scores are its rlnNumbaRecon* columns."""
    p = read_star(data_dir / "relion31.star")
    old = tmp_path / "old" / "run_data.star"
    (tmp_path / "old").mkdir()
    write_star(p, old, extra_columns={"rlnNumbaReconScore": np.array([0.3, -0.9, 0.1, -0.5, 0.8]),
                                      "rlnNumbaReconKept": np.array([0, 1, 1, 1, 0])})
    out = tmp_path / "clean.star"
    res = runner.invoke(main, ["select", str(old), "--max-score", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "kept 2 of 5" in res.output
    assert not [label for label in _star_labels(out) if label.startswith("rlnNumbaRecon")]
    kept = read_star(out, root=old.parent)
    assert sorted(kept.stack_indices.tolist()) == sorted(p.stack_indices[[1, 3]].tolist())
    res = runner.invoke(main, ["select", str(old), "--kept", "-o", str(tmp_path / "kept.star")])
    assert res.exit_code == 0 and "kept 3 of 5" in res.output


def test_select_without_scores_names_both_places(tmp_path, runner, data_dir):
    res = runner.invoke(main, ["select", str(data_dir / "relion31.star"), "--kept", "-o", str(tmp_path / "x.star")])
    assert res.exit_code == 2
    assert "relion31_scores.csv" in res.output and "rlnNumbaReconKept" in res.output
    assert not (tmp_path / "x.star").exists()


# --------------------------------------------------------------------------------------------
# 4. version and command line in STAR, CSV and MRC outputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run_data.star", "run_model.star"])
def test_star_outputs_start_with_version_and_command(run_dir, name):
    lines = (run_dir / name).read_text().splitlines()
    assert lines[0] == f"# numba-recon {__version__}"
    assert lines[1].startswith("# command: ") and "--epochs 1" in lines[1]
    first_block = next(i for i, line in enumerate(lines) if line.startswith("data_"))
    assert all(line.startswith("#") or not line.strip() for line in lines[:first_block])
    assert starfile.read(run_dir / name, always_dict=True)  # starfile skips the comment lines


@pytest.mark.parametrize("name", ["fsc.csv", "history.csv", "half_sets.csv", "run_data_scores.csv"])
def test_csv_outputs_start_with_version_and_command(run_dir, name):
    lines = (run_dir / name).read_text().splitlines()
    assert lines[0] == f"# numba-recon {__version__}" and lines[1].startswith("# command: ")
    assert not lines[2].startswith("#")
    assert len(pd.read_csv(run_dir / name, comment="#")) > 0


@pytest.mark.parametrize("name", ["run_class001", "run_half1_class001_unfil", "run_half2_class001_unfil"])
def test_maps_carry_version_name_and_command_in_their_labels(run_dir, name):
    path = run_dir / f"{name}.mrc"
    assert mrcfile.validate(str(path))
    with mrcfile.open(path) as mrc:
        labels = [bytes(mrc.header.label[i]).decode("ascii").rstrip() for i in range(int(mrc.header.nlabl))]
    assert labels[0].startswith(f"numba-recon {__version__} {name} ")
    command = "".join(labels[1:])
    assert command.startswith("command: ") and "--epochs" in command


def test_long_and_odd_command_lines(monkeypatch, tmp_path, data_dir):
    from numba_recon.io.mrc import write_volume
    from numba_recon.provenance import MRC_LABEL_CHARS, MRC_MAX_LABELS, command_line, comment_lines, mrc_labels

    argv = ["/usr/bin/numba-recon", "run", "my_data_set/particles.star", "--note", "two\nlines # version 3",
            "caf\udce9", "x" * 2000]
    monkeypatch.setattr(sys, "argv", argv)
    text = command_line()
    assert text.startswith("numba-recon run ") and "\n" not in text and "\\n" in text
    text.encode("utf-8")  # a lone surrogate (undecodable argv byte) is escaped
    star = comment_lines(star=True)
    # RELION takes any line containing "data_" for a block start when it reads the first block
    assert all("data_" not in line and "# version " not in line[1:] for line in star)
    assert "my_data\\_set" in star[1]
    labels = mrc_labels("run_class001")
    assert len(labels) == MRC_MAX_LABELS and all(len(lab) <= MRC_LABEL_CHARS for lab in labels)
    assert labels[-1].endswith("...")
    write_volume(tmp_path / "m.mrc", np.zeros((8, 8, 8), np.float32), 1.0)
    assert mrcfile.validate(str(tmp_path / "m.mrc"))
    p = read_star(data_dir / "relion31.star")
    out = tmp_path / "p.star"
    write_star(p, out)
    first_data = next(line for line in out.read_text().splitlines() if "data_" in line)
    assert first_data == "data_optics"
    assert len(read_star(out)) == len(p)
