"""Backend dispatch (``numba_recon.backend``) and the ``bench`` command."""

from __future__ import annotations

import importlib.util
import json
import logging
import types

import numba
import numpy as np
import pytest

from numba_recon import backend as backend_mod
from numba_recon import cpu
from numba_recon.backend import Backend, available_backends, get_backend
from numba_recon.cli import main
from numba_recon.errors import BackendUnavailableError




def _fake_cuda_module(available: bool = True) -> types.ModuleType:
    """A stand-in for numba_recon.cuda exporting the contract (the CPU functions)."""
    mod = types.ModuleType("numba_recon.cuda")
    for field in Backend._fields[1:]:
        setattr(mod, field, getattr(cpu, field))
    mod.is_available = lambda: available
    return mod


def test_cpu_backend_exports_the_contract():
    be = get_backend("cpu")
    assert be.name == "cpu"
    assert be.project is cpu.project and be.weighted_backproject is cpu.weighted_backproject
    assert all(callable(f) for f in be[1:])
    assert get_backend(" CPU ").name == "cpu"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of auto, cpu, cuda"):
        get_backend("gpu")


def test_auto_logs_its_choice(caplog):
    """The choice is logged: a GPU at INFO, the fall-back to the CPU only at DEBUG (-v), since most
    machines without a GPU need no reminder on every command."""
    with caplog.at_level(logging.DEBUG, logger="numba_recon.backend"):
        be = get_backend("auto")
    if numba.config.ENABLE_CUDASIM:
        assert be.name == "cpu"  # the simulator is never chosen automatically
    level = logging.INFO if be.name == "cuda" else logging.DEBUG
    assert any(r.levelno == level and f"backend auto: {be.name}" in r.getMessage() for r in caplog.records)


def test_auto_prefers_a_usable_gpu(monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_simulator", lambda: False)
    monkeypatch.setattr(backend_mod, "_cuda_module", lambda: (_fake_cuda_module(), None))
    with caplog.at_level(logging.DEBUG, logger="numba_recon.backend"):
        assert get_backend("auto").name == "cuda"
    assert "backend auto: cuda" in caplog.text
    monkeypatch.setattr(backend_mod, "_cuda_module", lambda: (None, "no CUDA GPU is visible"))
    with caplog.at_level(logging.DEBUG, logger="numba_recon.backend"):
        assert get_backend("auto").name == "cpu"
    assert "backend auto: cpu (no usable CUDA GPU: no CUDA GPU is visible)" in caplog.text


def test_cuda_without_numba_cuda_says_so(monkeypatch):
    monkeypatch.setattr(backend_mod, "_simulator", lambda: False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(backend_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba_cuda" else real_find_spec(name, *a))
    with pytest.raises(BackendUnavailableError, match="numba-cuda is not installed.*pip install"):
        get_backend("cuda")
    assert available_backends() == ["cpu"]


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(backend_mod, "_simulator", lambda: False)
    monkeypatch.setattr(backend_mod.importlib, "import_module", lambda name: _fake_cuda_module(available=False))
    with pytest.raises(BackendUnavailableError, match="CUDA backend unavailable: (no CUDA GPU|the CUDA driver)"):
        get_backend("cuda")


def test_incomplete_cuda_module_is_reported(monkeypatch):
    mod = _fake_cuda_module()
    del mod.forward_residual
    monkeypatch.setattr(backend_mod.importlib, "import_module", lambda name: mod)
    with pytest.raises(BackendUnavailableError, match="does not define forward_residual"):
        get_backend("cuda")


def test_simulator_is_the_cuda_backend():
    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("a real GPU was asked for (NUMBA_RECON_TEST_REAL_GPU=1); this test is about the simulator")
    be = get_backend("cuda")
    assert be.name == "cuda"
    assert "cuda" in available_backends()


# --- bench ----------------------------------------------------------------------------------------

def test_bench_case_reports_rates():
    from numba_recon.tools.bench import bench_case

    row = bench_case(get_backend("cpu"), box=16, batch=2, repeats=2)
    for name in ("project", "backproject", "loss_and_gradient"):
        assert row[f"{name}_images_per_s"] == pytest.approx(2 / row[f"{name}_s"])
        assert row[f"{name}_s"] > 0
    assert row["host_peak_rss_mib"] > 10 and row["gpu_used_mib"] is None
    assert row["radius_px"] == 7.0


def test_bench_command_writes_json_and_keeps_existing_outputs(runner, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--backend", "cpu", "--box", "12,13", "--batch", "1,2", "--repeats", "1", "--json", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(r["box"], r["batch"]) for r in data["results"]] == [(12, 1), (12, 2), (13, 1), (13, 2)]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["numba"] == numba.__version__
    assert all(r["backend"] == "cpu" and r["loss_and_gradient_images_per_s"] > 0 for r in data["results"])
    assert "loss+grad" in result.output

    before = out.read_text()
    again = runner.invoke(main, args)
    assert again.exit_code == 2
    assert "output file exists" in again.output and "--overwrite" in again.output
    assert out.read_text() == before
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_bench_command_rejects_bad_options(runner, monkeypatch):
    assert runner.invoke(main, ["bench", "--box", "0"]).exit_code == 2
    assert runner.invoke(main, ["bench", "--batch", "a,b"]).exit_code == 2
    monkeypatch.setattr(backend_mod, "_cuda_module", lambda: (None, "no CUDA GPU is visible"))
    result = runner.invoke(main, ["bench", "--backend", "cuda", "--box", "8"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("numba-recon: error: CUDA backend unavailable")
    assert "Traceback" not in result.output


def test_machine_info_names_the_cpu():
    from numba_recon.tools.bench import machine_info

    info = machine_info(["cpu"])
    assert info["cpu_model"] and info["numpy"] == np.__version__
