"""The one-shot acceptance check (``numba_recon.cuda.acceptance``) and the device-check preamble.

The whole acceptance check runs once, with ``--quick`` sizes, in a subprocess whose environment
sets ``NUMBA_ENABLE_CUDASIM=1`` (the simulator must be chosen before numba is imported), about a
minute and a half on 2 cores. The other tests call the pieces in this process: the simulator is in
effect here because ``tests/conftest.py`` sets it before numba loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from numba_recon.cuda import _target, acceptance, device_check

needs_simulator = pytest.mark.skipif(
    not _target.SIMULATOR,
    reason="needs the CUDA simulator: NUMBA_ENABLE_CUDASIM=1 was not in effect when numba.cuda was imported")

CONTRACT_KERNELS = {"project", "backproject", "weighted_backproject", "forward_residual", "forward_residual_loss",
                    "insert_weights", "weight_filters", "prepare_particles_data", "prepare_particles_filters2",
                    "prepare_particles_data_norm2", "prepare_particles_noise_var"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acceptance")
    out = tmp / "acceptance.json"
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    env.pop("NUMBA_RECON_TEST_REAL_GPU", None)
    proc = subprocess.run([sys.executable, "-m", "numba_recon.cuda.acceptance", "--json", str(out), "--quick",
                           "--workdir", str(tmp / "work")],
                          env=env, capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text()) if out.is_file() else None
    return proc, result, tmp


@pytest.mark.mpi
@pytest.mark.slow
def test_quick_acceptance_runs_every_step_in_the_simulator(quick_run):
    proc, result, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result is not None
    assert {"tool", "numba_recon_version", "started_utc", "simulator", "quick", "settings", "device", "steps",
            "passed", "counts", "elapsed_s"} <= set(result)
    assert result["simulator"] is True and result["quick"] is True and result["passed"] is True
    assert list(result["steps"]) == list(acceptance.STEPS)
    for name, step in result["steps"].items():
        assert set(step) == {"status", "reason", "seconds", "figures"}, name
        assert step["status"] in ("passed", "skipped"), (name, step["reason"])
        if step["status"] == "skipped":
            assert step["reason"], name
        else:
            assert step["reason"] is None and step["figures"], name
    counts = result["counts"]
    assert set(counts) == set(acceptance.STATUSES) and sum(counts.values()) == len(acceptance.STEPS)
    # one console line per step, then the summary
    lines = proc.stdout.splitlines()
    for name in acceptance.STEPS:
        assert any(line.startswith(f"acceptance: {name} ") for line in lines), name
    assert lines[-1].startswith("acceptance: ") and ", 0 failed, " in lines[-1]


@pytest.mark.mpi
@pytest.mark.slow
def test_quick_acceptance_figures(quick_run):
    _, result, _ = quick_run
    steps = result["steps"]
    settings = result["settings"]

    pre = steps["preamble"]["figures"]
    assert pre["status"] == "passed"
    for key in ("driver_version", "driver_cuda_version", "runtime_version"):
        assert pre[key] == "simulator"
    assert pre["kernel"]["passed"] is True and pre["kernel"]["wrong_values"] == 0
    assert result["device"]["device_name"] and result["device"]["compute_capability"]

    parity = steps["parity"]["figures"]
    assert [(c["box"], c["batch"]) for c in parity["cases"]] == [tuple(c) for c in settings["parity_cases"]]
    assert all(8 <= c["box"] <= 16 for c in parity["cases"])
    for case in parity["cases"]:
        assert set(case["errors"]) == CONTRACT_KERNELS
        assert case["passed"] is True
        assert all(0 <= v <= parity["tolerance"] for v in case["errors"].values())

    rep = steps["repeatability"]["figures"]
    assert set(rep["kernels"]) == CONTRACT_KERNELS
    for name in acceptance.BITWISE_KERNELS:
        assert rep["kernels"][name]["bitwise"] is True
    assert all(k["passed"] for k in rep["kernels"].values())

    rows = [r for r in steps["timing"]["figures"]["rows"] if "op" in r]
    assert {r["op"] for r in rows} == {"project", "backproject", "loss_and_gradient", "prepare_particles"}
    assert {r["box"] for r in rows} == {*settings["timing_boxes"], settings["once_box"]}
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in rows)

    e2e = steps["end_to_end"]["figures"]
    box = settings["e2e_box"]
    for backend in ("cuda", "cpu"):
        run = e2e["runs"][backend]
        assert run["backend"] == backend and run["ranks"] == 1
        assert run["particles"] == settings["e2e_particles"] and run["images_per_s"] > 0
        assert "epochs_s" in run["timings_s"]
    assert set(e2e["fsc_cuda_vs_cpu"]) == set(acceptance.MAPS)
    for curve in e2e["fsc_cuda_vs_cpu"].values():
        assert len(curve["fsc"]) == box // 2 + 1
        assert curve["fsc_min"] > acceptance.FSC_MIN
    assert e2e["fsc_min"] > acceptance.FSC_MIN

    mpi = steps["mpi_shared_gpu"]
    if mpi["status"] == "skipped":
        assert "mpiexec" in mpi["reason"]
    else:
        assert mpi["figures"]["run"]["ranks"] == 2 and mpi["figures"]["run"]["backend"] == "cuda"
        assert mpi["figures"]["fsc_min"] > acceptance.FSC_MIN


@pytest.mark.mpi
@pytest.mark.slow
def test_quick_acceptance_keeps_its_workdir_when_given(quick_run):
    _, result, tmp = quick_run
    work = tmp / "work"
    assert result["settings"]["workdir"] == str(work)
    assert (work / "run_cuda" / "summary.json").is_file() and (work / "run_cpu" / "summary.json").is_file()


# ------------------------------------------------------------------------------------------
# the preamble


@needs_simulator
def test_preamble_in_the_simulator():
    info = device_check.preamble()
    assert info["status"] == "passed" and info["problem"] is None
    assert info["driver_version"] == info["runtime_version"] == info["driver_cuda_version"] == "simulator"
    assert info["kernel"] == {**info["kernel"], "name": "add_one", "passed": True, "wrong_values": 0}
    line = device_check.preamble_line(info)
    assert "simulator" in line and "add-one kernel ok" in line


@pytest.mark.parametrize(("toolkit", "driver_cuda", "release", "cc", "problem", "hint"), [
    ((13, 0), (12, 8), "570.124.06", (9, 0), "the CUDA 13 toolchain needs driver >= 580; this node has 570.124.06",
     "pip install 'numba-recon[cu12]'"),
    ((13, 0), None, "535.183.01", None, "needs driver >= 580; this node has 535.183.01",
     "numba-recon[cu12]"),
    ((13, 0), (12, 2), None, None, "needs driver >= 580", "numba-recon[cu12]"),
    ((12, 4), (11, 4), "470.256.02", (8, 0), "the CUDA 12 toolchain needs driver >= 525",
     "upgrade the NVIDIA driver"),
    ((13, 0), (13, 0), "580.65.06", (7, 0), "does not compile for compute capability 7.0", "numba-recon[cu12]"),
    ((12, 9), (12, 8), "570.124.06", (9, 0), None, None),   # minor version compatibility: fine
    ((12, 4), (13, 0), "580.65.06", (9, 0), None, None),    # newer drivers run older toolkits
    ((13, 0), (13, 0), "580.65.06", (9, 0), None, None),
])
def test_diagnose_names_the_problem_and_the_extra(toolkit, driver_cuda, release, cc, problem, hint):
    found = device_check.diagnose(toolkit, driver_cuda, release, cc)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found[0] and hint in found[1]


def test_parse_driver_release():
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_module = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                   "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 22:50:36 UTC 2025\n")
    assert device_check.parse_driver_release(proprietary) == "535.129.03"
    assert device_check.parse_driver_release(open_module) == "570.86.15"
    assert device_check.parse_driver_release("no driver here") is None


_FAILED = {"status": "failed", "simulator": False, "driver_version": "570.124.06", "driver_cuda_version": "12.8",
           "runtime_version": "13.0", "problem": "the CUDA 13 toolchain needs driver >= 580; this node has 570.124.06",
           "hint": "pip install 'numba-recon[cu12]'"}


@needs_simulator
def test_device_check_stops_with_one_line_when_the_preamble_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device_check, "preamble", lambda: dict(_FAILED))
    out = tmp_path / "dc.json"
    assert device_check.main(["--simulator-smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["device_check: the CUDA 13 toolchain needs driver >= 580; this node has 570.124.06: "
                   "pip install 'numba-recon[cu12]'"]
    result = json.loads(out.read_text())
    assert result["preamble"]["status"] == "failed"
    assert "correctness" not in result and "timing" not in result


def test_acceptance_skips_every_step_when_the_preamble_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device_check, "preamble", lambda: dict(_FAILED))
    out = tmp_path / "acc.json"
    assert acceptance.main(["--json", str(out), "--quick", "--workdir", str(tmp_path / "w")]) == 2
    printed = capsys.readouterr().out
    assert "needs driver >= 580" in printed and "numba-recon[cu12]" in printed
    result = json.loads(out.read_text())
    assert list(result["steps"]) == list(acceptance.STEPS)
    assert result["steps"]["preamble"]["status"] == "failed"
    assert result["steps"]["preamble"]["figures"]["hint"] == _FAILED["hint"]
    for name in acceptance.STEPS[1:]:
        assert result["steps"][name]["status"] == "skipped"
        assert result["steps"][name]["reason"].startswith("the preamble failed")
    assert result["passed"] is False and result["counts"] == {"passed": 0, "failed": 1, "skipped": 5}


def test_mpi_step_is_skipped_with_a_reason_without_mpiexec(tmp_path, monkeypatch):
    monkeypatch.setattr(acceptance, "_find_mpiexec", lambda: None)
    check = acceptance.Acceptance(tmp_path / "a.json", acceptance.QUICK, True, 60.0, tmp_path)
    check.step("mpi_shared_gpu", check.mpi_shared_gpu)
    step = json.loads((tmp_path / "a.json").read_text())["steps"]["mpi_shared_gpu"]
    assert step["status"] == "skipped" and "mpiexec not found" in step["reason"]


def test_a_step_is_skipped_when_the_budget_is_used_up(tmp_path):
    check = acceptance.Acceptance(tmp_path / "a.json", acceptance.QUICK, True, 1.0, tmp_path)
    check.step("end_to_end", check.end_to_end, min_left_s=30.0)
    step = json.loads((tmp_path / "a.json").read_text())["steps"]["end_to_end"]
    assert step["status"] == "skipped" and "time budget" in step["reason"]


def test_full_sizes_are_the_documented_ones():
    full = acceptance.FULL
    assert full.parity_cases == [(100, 150), (256, 130)]
    assert full.timing_boxes == [64, 128, 256] and full.once_box == 400
    assert acceptance.DEFAULT_BUDGET_S <= 180
    assert all(8 <= n <= 16 for n, _ in acceptance.QUICK.parity_cases)
