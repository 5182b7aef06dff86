"""Particle preparation as a backend function: ``prepare_particles`` on the CPU (the loader's numpy
arithmetic, bit for bit) and on the device (Numba's CUDA simulator here), and its argument checks.

The device twin evaluates the CTF and the shift's phase ramp per frequency and applies them in
Fourier space between the DFT stages, with the half-grid semantics of the host on the Nyquist
lines of an even box; tiny odd and even boxes with non-integer shifts and astigmatic CTFs check
exactly those lines. Tolerances are relative to the largest value of each output: the differences
come from float32 DFTs and float32 sin/exp against the host's float64 CTF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.fft

from numba_recon import cpu
from numba_recon.batch import BatchLoader, background_mask
from numba_recon.cpu.prepare import (CTF_COLUMNS, background_means, ctf_parameters, prepare_particles, rfft_half,
                                     shift_phase)
from numba_recon.ctf import ctf_images
from numba_recon.particles import CTF_KEYS

#: device vs CPU, as a fraction of the largest CPU value of the output
DATA_RTOL = 1e-5
FILTERS_RTOL = 1e-6
NORM_RTOL = 1e-5
NOISE_RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("fast_thread_switching")  # the simulator's threads meet at barriers


def _simulate(path: Path, n: int, box: int) -> Path:
    from numba_recon.sim.simulate import simulate_dataset

    simulate_dataset(path, n_particles=n, box_size=box, pixel_size_angstrom=3.0, snr=0.3, max_shift_px=2.5,
                     seed=11, particles_per_stack=n, overwrite=True)
    return path / "particles.star"


def _particles(tmp_path: Path, n: int, box: int):
    """A simulated set with CTF phase shifts, B-factors and some premultiplied rows."""
    from numba_recon.read import read_particles

    p = read_particles(_simulate(tmp_path / f"data{box}", n, box))
    p.ctf_premultiplied[::3] = True
    p.ctf["phase_shift_deg"][:] = np.linspace(0.0, 90.0, n)
    p.ctf["bfactor_angstrom2"][:] = np.linspace(0.0, 150.0, n)
    return p


def _reference_rows(p, index: np.ndarray, images: np.ndarray, mask: np.ndarray):
    """The loader's preparation as it was written in ``BatchLoader._prepare_rows``."""
    box = p.box_size
    b = index.size
    data = np.empty((b, box, box), np.float32)
    filters2 = np.empty((b, box, box), np.float32)
    images = images - background_means(images, mask)[:, None, None].astype(np.float32)
    ctf_full = ctf_images({k: v[index] for k, v in p.ctf.items()}, box, p.pixel_size_angstrom, half=False)
    ctf_half = rfft_half(ctf_full)
    if box % 2 == 0:
        corner = {k: v[index] for k, v in p.ctf.items()}
        ctf_half[:, box // 2, box // 2] = ctf_images(corner, 2, p.pixel_size_angstrom, half=True)[:, 1, 1]
    premult = p.ctf_premultiplied[index]
    h_half = np.where(premult[:, None, None], ctf_half * ctf_half, ctf_half)
    h_full = np.where(premult[:, None, None], ctf_full * ctf_full, ctf_full)
    spectrum = scipy.fft.rfft2(images) * shift_phase(box, p.shifts_px[index])
    shifted = scipy.fft.irfft2(spectrum, s=(box, box))
    data[:] = scipy.fft.irfft2(spectrum * h_half, s=(box, box)).astype(np.float32)
    norm2 = np.einsum("bij,bij->b", shifted, shifted, dtype=np.float64).astype(np.float32)
    noise_var = images[:, mask].var(axis=1, dtype=np.float64).astype(np.float32)
    filters2[:] = (h_full * h_full).astype(np.float32, copy=False)
    return data, filters2, norm2, noise_var


def _outputs(b: int, n: int) -> list[np.ndarray]:
    return [np.empty((b, n, n), np.float32), np.empty((b, n, n), np.float32), np.empty(b, np.float32),
            np.empty(b, np.float32)]


def _batch(n: int, b: int, seed: int):
    """Raw images (one with a large background offset) and per-particle parameters: astigmatic
    CTFs with phase shifts and B-factors, premultiplied rows, integer and non-integer shifts."""
    rng = np.random.default_rng(seed)
    images = (rng.standard_normal((b, n, n)) * 2.0).astype(np.float32)
    images[0] += np.float32(500.0)  # raw counts: the background mean is far from zero
    params = np.empty((b, len(CTF_COLUMNS)))
    params[:, 0] = rng.uniform(8000.0, 30000.0, b)
    params[:, 1] = params[:, 0] + rng.uniform(-3000.0, 3000.0, b)
    params[:, 2] = rng.uniform(-180.0, 180.0, b)
    params[:, 3] = (300.0, 200.0, 300.0, 120.0)[:b]
    params[:, 4] = 2.7
    params[:, 5] = (0.1, 0.07, 0.1, 0.2)[:b]
    params[:, 6] = rng.uniform(0.0, 90.0, b)
    params[:, 7] = rng.uniform(0.0, 200.0, b)
    params[:, 8] = rng.uniform(0.5, 1.5, b)
    shifts = rng.uniform(-3.0, 3.0, (b, 2))
    shifts[1] = (2.0, -1.0)  # integer shift
    premult = np.zeros(b, dtype=bool)
    premult[1::2] = True
    return images, params, shifts, premult


def _run_device(be, images, params, shifts, premult, pixel_size, mask) -> list[np.ndarray]:
    b, n = images.shape[0], images.shape[1]
    outs = [be.zeros(o.shape) for o in _outputs(b, n)]
    be.prepare_particles(be.to_device(images), be.to_device(params, None), be.to_device(shifts, None),
                         be.to_device(premult, None), pixel_size, be.to_device(mask, None), *outs)
    return [be.to_host(o) for o in outs]


def _relative_differences(want: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    names = ("data", "filters2", "data_norm2", "noise_var")
    return {name: float(np.abs(w.astype(np.float64) - g).max() / np.abs(w).max())
            for name, w, g in zip(names, want, got)}


# ------------------------------------------------------------------------------------------
# CPU: the loader's arithmetic


def test_ctf_columns_are_the_particle_set_keys():
    assert CTF_COLUMNS == CTF_KEYS


def test_ctf_parameters_stacks_the_columns_in_order():
    ctf = {k: np.arange(5, dtype=np.float32) + 10 * i for i, k in enumerate(CTF_KEYS)}
    params = ctf_parameters(ctf, np.array([3, 1]))
    assert params.dtype == np.float64 and params.shape == (2, 9) and params.flags.c_contiguous
    np.testing.assert_array_equal(params[:, 4], [43.0, 41.0])
    assert ctf_parameters(ctf).shape == (5, 9)
    with pytest.raises(ValueError, match="lacks scale"):
        ctf_parameters({k: v for k, v in ctf.items() if k != "scale"})


@pytest.mark.parametrize("box", [16, 15])
def test_cpu_twin_is_the_loader_preparation_bit_for_bit(tmp_path, box):
    p = _particles(tmp_path, 12, box)
    index = np.array([7, 0, 11, 3, 4, 9])
    images = p.read_images(index).astype(np.float32)
    mask = background_mask(box)
    want = _reference_rows(p, index, images, mask)
    got = _outputs(index.size, box)
    prepare_particles(images, ctf_parameters(p.ctf, index), p.shifts_px[index].astype(np.float64),
                      p.ctf_premultiplied[index], p.pixel_size_angstrom, mask, *got)
    prep = BatchLoader(p, cache_bytes=0, prefetch=0).prepare(index)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
    # the loader calls the twin; it floors the noise variance afterwards
    np.testing.assert_array_equal(prep.data, want[0])
    np.testing.assert_array_equal(prep.filters2, want[1])
    np.testing.assert_array_equal(prep.data_norm2, want[2])
    np.testing.assert_array_equal(prep.noise_var, np.maximum(want[3], np.float32(1e-12)))


def test_cpu_twin_writes_nothing_for_an_empty_batch():
    prepare_particles(np.zeros((0, 8, 8), np.float32), np.zeros((0, 9)), np.zeros((0, 2)), np.zeros(0, bool), 1.0,
                      background_mask(8), *_outputs(0, 8))


# ------------------------------------------------------------------------------------------
# device (simulator) against the CPU


@pytest.mark.parametrize("n", [pytest.param(9, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow), 16])
def test_device_matches_the_cpu(n, make_backend):
    be = make_backend("cuda")
    images, params, shifts, premult = _batch(n, 4 if n < 16 else 3, seed=n)
    mask = background_mask(n)
    want = _outputs(images.shape[0], n)
    prepare_particles(images, params, shifts, premult, 2.5, mask, *want)
    got = _run_device(be, images, params, shifts, premult, 2.5, mask)
    rel = _relative_differences(want, got)
    assert rel["data"] <= DATA_RTOL, rel
    assert rel["filters2"] <= FILTERS_RTOL, rel
    assert rel["data_norm2"] <= NORM_RTOL, rel
    assert rel["noise_var"] <= NOISE_RTOL, rel
    # per particle too: the norms and variances of the smaller images are as close
    np.testing.assert_allclose(got[2], want[2], rtol=NORM_RTOL)
    np.testing.assert_allclose(got[3], want[3], rtol=NOISE_RTOL)


def test_device_matches_the_loader_on_a_simulated_set(tmp_path, make_backend):
    be = make_backend("cuda")
    p = _particles(tmp_path, 3, 10)
    index = np.arange(3)
    prep = BatchLoader(p, cache_bytes=0, prefetch=0).prepare(index)
    got = _run_device(be, p.read_images(index).astype(np.float32), ctf_parameters(p.ctf, index),
                      p.shifts_px[index].astype(np.float64), p.ctf_premultiplied[index], p.pixel_size_angstrom,
                      background_mask(10))
    rel = _relative_differences([prep.data, prep.filters2, prep.data_norm2, prep.noise_var], got)
    assert rel["data"] <= DATA_RTOL and rel["filters2"] <= FILTERS_RTOL, rel
    assert rel["data_norm2"] <= NORM_RTOL and rel["noise_var"] <= NOISE_RTOL, rel


def test_device_takes_uint8_flags_and_an_empty_batch(make_backend):
    be = make_backend("cuda")
    n = 9
    images, params, shifts, premult = _batch(n, 2, seed=3)
    mask = background_mask(n)
    want = _outputs(2, n)
    prepare_particles(images, params, shifts, premult.astype(np.uint8), 1.5, mask.astype(np.uint8), *want)
    got = _run_device(be, images, params, shifts, premult.astype(np.uint8), 1.5, mask.astype(np.uint8))
    rel = _relative_differences(want, got)
    assert rel["data"] <= DATA_RTOL and rel["filters2"] <= FILTERS_RTOL, rel
    outs = [be.zeros(o.shape) for o in _outputs(0, n)]
    be.prepare_particles(be.zeros((0, n, n)), be.zeros((0, 9), np.float64), be.zeros((0, 2), np.float64),
                         be.zeros(0, np.uint8), 1.0, be.to_device(mask, None), *outs)


def test_both_backends_export_prepare_particles(make_backend):
    assert make_backend("cpu").prepare_particles is cpu.prepare_particles
    from numba_recon import cuda as nc

    assert make_backend("cuda").prepare_particles is nc.prepare_particles


# ------------------------------------------------------------------------------------------
# argument checks


def _good_args(n: int = 8, b: int = 2) -> dict:
    return {"images": np.zeros((b, n, n), np.float32), "ctf_params": np.zeros((b, 9)),
            "shifts_px": np.zeros((b, 2)), "premultiplied": np.zeros(b, bool), "pixel_size_angstrom": 1.0,
            "background_mask": background_mask(n), "data_out": np.zeros((b, n, n), np.float32),
            "filters2_out": np.zeros((b, n, n), np.float32), "data_norm2_out": np.zeros(b, np.float32),
            "noise_var_out": np.zeros(b, np.float32)}


BAD_ARGS = [
    ("images", np.zeros((2, 8, 8), np.float64), TypeError, "images: expected float32"),
    ("images", np.zeros((2, 8, 9), np.float32), ValueError, r"images: expected shape \(2, 8, 8\)"),
    ("images", np.zeros((8, 8), np.float32), ValueError, "images: expected shape"),
    ("images", [[[0.0]]], TypeError, "images: expected a numpy array"),
    ("ctf_params", np.zeros((2, 8)), ValueError, r"ctf_params: expected shape \(2, 9\)"),
    ("ctf_params", np.zeros((2, 9), np.float32), TypeError, "ctf_params: expected float64"),
    ("shifts_px", np.zeros((2, 3)), ValueError, r"shifts_px: expected shape \(2, 2\)"),
    ("shifts_px", np.zeros((2, 2), np.int64), TypeError, "shifts_px: expected float64"),
    ("premultiplied", np.zeros(3, bool), ValueError, r"premultiplied: expected shape \(2,\)"),
    ("premultiplied", np.zeros(2, np.float32), TypeError, "premultiplied: expected bool or uint8"),
    ("background_mask", np.zeros((9, 9), bool), ValueError, r"background_mask: expected shape \(8, 8\)"),
    ("data_out", np.zeros((2, 8, 8), np.float64), TypeError, "data_out: expected float32"),
    ("filters2_out", np.zeros((2, 8, 8), np.float32)[:, ::-1], ValueError, "filters2_out: expected a C-contiguous"),
    ("data_norm2_out", np.zeros(3, np.float32), ValueError, r"data_norm2_out: expected shape \(2,\)"),
    ("noise_var_out", np.zeros(2, np.float64), TypeError, "noise_var_out: expected float32"),
    ("pixel_size_angstrom", 0.0, ValueError, "pixel_size_angstrom must be finite and > 0"),
    ("pixel_size_angstrom", float("nan"), ValueError, "pixel_size_angstrom must be finite and > 0"),
]


_IDS = [f"{a[0]}-{i}" for i, a in enumerate(BAD_ARGS)]
#: cases that exist only for host arrays: to_device copies any array-like to a C-contiguous array
_HOST_ONLY = ("a numpy array", "C-contiguous")
_DEVICE_CASES = [(a, i) for a, i in zip(BAD_ARGS, _IDS) if not any(h in a[3] for h in _HOST_ONLY)]


@pytest.mark.parametrize("name, value, error, message", BAD_ARGS, ids=_IDS)
def test_cpu_refuses_bad_arguments(name, value, error, message):
    args = _good_args()
    args[name] = value
    with pytest.raises(error, match=message):
        prepare_particles(**args)


@pytest.mark.parametrize("name, value, error, message", [a for a, _ in _DEVICE_CASES],
                         ids=[i for _, i in _DEVICE_CASES])
def test_device_refuses_bad_arguments(name, value, error, message, make_backend):
    be = make_backend("cuda")
    args = {k: v if k == "pixel_size_angstrom" else be.to_device(v, None) for k, v in _good_args().items()}
    if name != "pixel_size_angstrom":
        value = be.to_device(value, None)
    args[name] = value
    with pytest.raises(error, match=message):
        be.prepare_particles(**args)


def test_device_refuses_host_arrays(make_backend):
    be = make_backend("cuda")
    args = {k: v if k == "pixel_size_angstrom" else be.to_device(v, None) for k, v in _good_args().items()}
    args["shifts_px"] = np.zeros((2, 2))
    with pytest.raises(TypeError, match="shifts_px: expected a CUDA device array"):
        be.prepare_particles(**args)


# ------------------------------------------------------------------------------------------
# compile-only: the kernels build for a real GPU (no simulator in the subprocess)

_PREPARE_REPORT = """
from numba_recon.cuda.compile_check import _F64_OP, _compile
out = {}
for name in ("prepare_background", "prepare_spectrum"):
    for cc in ((9, 0), (8, 0)):
        ptx = _compile(name, cc)
        local = sum(int(m) for m in re.findall(r"\\.local\\s+\\.align\\s+\\d+\\s+\\.b8\\s+\\S+\\[(\\d+)\\]", ptx))
        out[f"{name}/sm{cc[0]}{cc[1]}"] = {"chars": len(ptx), "f64_ops": len(_F64_OP.findall(ptx)),
                                           "local_bytes": local, "sin_approx": "sin.approx" in ptx}
return out
"""


@pytest.mark.slow
def test_prepare_kernels_compile_for_hopper_and_ampere(compile_only):
    report = compile_only(_PREPARE_REPORT)
    assert len(report) == 4 and all(r["chars"] > 1000 for r in report.values()), report
    # the reductions are float64 by design; the background pass keeps its state in registers
    assert report["prepare_background/sm90"]["f64_ops"] > 0
    assert report["prepare_background/sm90"]["local_bytes"] == 0
    # CTF and ramp phases are formed in float64; sin/cos are the accurate functions, not the
    # approximate intrinsics (their only local memory is libdevice's huge-argument reduction,
    # never reached: the arguments are reduced to [-pi, pi] first)
    spectrum = report["prepare_spectrum/sm90"]
    assert spectrum["f64_ops"] > 0 and not spectrum["sin_approx"]
