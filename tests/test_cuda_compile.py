"""Compile-only tier: every CUDA kernel compiles to PTX with the argument types its launcher passes.

The simulator does no type inference, so this is the check that the kernels compile for a real
GPU at all. It needs libNVVM (numba-cuda's cu12/cu13 extras) but no GPU, and it must run without
``NUMBA_ENABLE_CUDASIM`` (which conftest sets for this process): hence one subprocess for the
whole module (conftest's ``compile_only``). Skipped, with the reason, when libNVVM is missing.
"""

from __future__ import annotations

import pytest

from numba_recon.cuda import compile_check

_REPORT = """
from numba_recon.cuda.compile_check import compile_all, compile_report
return {"sm90": compile_report((9, 0)), "sm90_chars": compile_all((9, 0)), "sm80_chars": compile_all((8, 0))}
"""


@pytest.fixture(scope="module")
def compiled(compile_only) -> dict:
    return compile_only(_REPORT)


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_and_ampere(compiled):
    assert set(compiled["sm90"]) == set(compile_check.KERNELS)
    assert {"project", "backproject", "dft_stage", "residual_loss", "fill"} <= set(compile_check.KERNELS)
    for chars in ("sm90_chars", "sm80_chars"):
        assert set(compiled[chars]) == set(compile_check.KERNELS)
        assert all(n > 1000 for n in compiled[chars].values()), compiled[chars]


@pytest.mark.slow
def test_hot_kernels_do_no_float64_arithmetic(compiled):
    # a float64 literal in a float32 expression silently promotes it; on most GPUs that costs 2-64x
    for name in compile_check.FLOAT32_ONLY:
        assert compiled["sm90"][name]["f64_ops"] == 0, name


@pytest.mark.slow
def test_hot_kernels_keep_their_state_in_registers(compiled):
    # the 4 x 4 accumulator of the DFT kernel must not spill to local memory
    for name in compile_check.FLOAT32_ONLY:
        assert compiled["sm90"][name]["local_bytes"] == 0, name


@pytest.mark.slow
def test_projector_splats_through_shared_memory_and_backprojector_gathers(compiled):
    report = compiled["sm90"]
    assert report["project"]["shared_atomics"] >= 4     # the four corners into the shared tile
    assert report["project"]["global_atomics"] >= 1     # the tile flush
    assert report["backproject"]["shared_atomics"] == 0
    assert report["backproject"]["global_atomics"] == 0  # a gather: no atomics at all


_PREAMBLE_PTX = """
from numba_recon.cuda.device_check import _add_one_kernel
return {f"sm{a}{b}": _target.cuda.compile_ptx(_add_one_kernel.py_func, "void(float32[::1])", cc=(a, b))[0]
        for a, b in ((9, 0), (8, 0))}
"""


def test_device_check_preamble_kernel_compiles(compile_only):
    """The preamble's add-one kernel (the first kernel a GPU node runs) compiles for sm_90 and sm_80."""
    ptx = compile_only(_PREAMBLE_PTX)
    for target in ("sm90", "sm80"):
        text = ptx[target]
        assert ".entry" in text and ("add.f32" in text or "add.rn.f32" in text), target
        assert ".f64" not in text, target


@pytest.mark.slow
def test_optimiser_step_kernels_compile_in_float32(compiled):
    # the adam step runs on the device every minibatch: float32 throughout, nothing spilled
    for name in ("adam", "scale_gradient", "adam_decay"):
        assert name in compiled["sm90"] and compiled["sm80_chars"][name] > 1000, name
        assert compiled["sm90"][name]["f64_ops"] == 0, name
        assert compiled["sm90"][name]["local_bytes"] == 0, name
    # the second moment's sum of squares is float64 by design (one pass over the map per step),
    # reduced in shared memory with one atomic add per block
    square = compiled["sm90"]["adam_square"]
    assert square["f64_ops"] > 0 and square["local_bytes"] == 0 and square["global_atomics"] >= 1
