"""The CUDA kernels in Numba's CUDA simulator, against plain NumPy gold implementations.

``tests/conftest.py`` sets ``NUMBA_ENABLE_CUDASIM=1`` before numba is imported. The simulator
runs one OS thread per CUDA thread, so boxes are tiny (N from 7 to 12) and batches at most 2;
boxes up to 8 are one 8 x 8 x 8 brick of the projector kernels, larger ones cost about 8x more.
The gold projector is a dense matrix built voxel by voxel in plain Python from the kernel
contract (``docs/architecture.md``); its transpose is the gold back-projector.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest


from numba_recon import cuda as nc  # noqa: E402
from numba_recon.cuda import _target, device_check, fourier, memory  # noqa: E402
from numba_recon.cuda._target import cuda  # noqa: E402
from numba_recon.geometry import euler_to_matrix, random_rotations  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not _target.SIMULATOR,
        reason="needs the CUDA simulator: NUMBA_ENABLE_CUDASIM=1 was not in effect when numba.cuda was imported"),
    # the simulator runs one OS thread per CUDA thread; they meet at barriers (see conftest)
    pytest.mark.usefixtures("fast_thread_switching"),
]

RTOL = 1e-5  # float32 kernels against float64 gold, relative to the largest gold value
DOT_RTOL = 1e-4


# ------------------------------------------------------------------------------------------
# gold implementations


def gold_projection_matrix(n: int, rotations: np.ndarray, radius_px: float) -> np.ndarray:
    """Dense ``P``: ``(b, N*N, N**3)`` float64, straight from the contract's words.

    Voxel ``(k, i, j)`` has offset ``r = (j - c, i - c, k - c)``; inside the support it is splatted
    at ``(u, v) = ((A r)_x + c, (A r)_y + c)`` with bilinear weights; corners outside are dropped.
    """
    c = n // 2
    rot = np.asarray(rotations, dtype=np.float64)
    p = np.zeros((len(rot), n * n, n ** 3))
    for b, a in enumerate(rot):
        for k in range(n):
            for i in range(n):
                for j in range(n):
                    r = np.array([j - c, i - c, k - c], dtype=np.float64)
                    if r @ r > radius_px ** 2:
                        continue
                    u = a[0] @ r + c
                    v = a[1] @ r + c
                    x0 = math.floor(u)
                    y0 = math.floor(v)
                    fx = u - x0
                    fy = v - y0
                    col = (k * n + i) * n + j
                    for y, x, w in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                                    (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
                        if 0 <= x < n and 0 <= y < n:
                            p[b, y * n + x, col] += w
    return p


def gold_project(p: np.ndarray, volume: np.ndarray) -> np.ndarray:
    n = volume.shape[0]
    return (p @ volume.reshape(-1).astype(np.float64)).reshape(-1, n, n)


def gold_backproject(p: np.ndarray, images: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    n = images.shape[1]
    s = np.ones(len(images)) if scale is None else np.asarray(scale, dtype=np.float64)
    flat = images.reshape(len(images), -1).astype(np.float64) * s[:, None]
    return np.einsum("bpv,bp->v", p, flat).reshape(n, n, n)


def gold_fourier_filter(images: np.ndarray, filters: np.ndarray) -> np.ndarray:
    return np.real(np.fft.ifft2(filters.astype(np.float64) * np.fft.fft2(images.astype(np.float64))))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def ctf_like_filters(n: int, nb: int, rng: np.random.Generator) -> np.ndarray:
    freq = np.fft.fftfreq(n)
    k2 = freq[:, None] ** 2 + freq[None, :] ** 2
    defocus = rng.uniform(20.0, 60.0, nb)
    return (np.sin(defocus[:, None, None] * k2) * np.exp(-3.0 * k2)).astype(np.float32)


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# project / backproject


@pytest.mark.parametrize(("n", "threads_per_block", "radius_px"), [
    (8, 64, 3.5),         # one-plane bricks; support touches the image edge, corners dropped
    # odd box, partial bricks, whole box: many corners fall off the image
    pytest.param(9, 128, math.inf, marks=pytest.mark.slow),
    # 8 x 8 x 4 bricks, tiles shifted against the image (512: other tests)
    pytest.param(12, 256, 5.0, marks=pytest.mark.slow),
])
def test_project_and_backproject_match_dense_gold(n, threads_per_block, radius_px, rng):
    nb = 2
    rot = f32(random_rotations(nb, rng))
    volume = f32(rng.standard_normal((n, n, n)))
    images = f32(rng.standard_normal((nb, n, n)))
    p = gold_projection_matrix(n, rot, radius_px)

    # outputs start non-zero: the kernels must accumulate
    base_img = f32(rng.standard_normal((nb, n, n)))
    out = nc.to_device(base_img)
    nc.project(nc.to_device(volume), nc.to_device(rot), radius_px, out, threads_per_block=threads_per_block)
    proj = nc.to_host(out)
    assert rel_err(proj - base_img, gold_project(p, volume)) < RTOL

    base_vol = f32(rng.standard_normal((n, n, n)))
    out_vol = nc.to_device(base_vol)
    nc.backproject(nc.to_device(images), nc.to_device(rot), radius_px, out_vol, threads_per_block=threads_per_block)
    bp = nc.to_host(out_vol) - base_vol
    assert rel_err(bp, gold_backproject(p, images)) < RTOL

    lhs = float(np.vdot((proj - base_img).astype(np.float64), images))
    rhs = float(np.vdot(volume.astype(np.float64), bp))
    assert abs(lhs - rhs) <= DOT_RTOL * abs(lhs)


def test_matrices_that_are_not_rotations_use_the_global_splat_path(rng):
    # A stretched, sheared matrix throws corners outside the shared tile of a brick: those go to
    # global memory directly. Result and adjoint must still be exact.
    n, nb = 8, 2
    rot = random_rotations(nb, rng)
    rot[0] *= 1.8
    rot[1, 0, :] += 0.9 * rot[1, 1, :]
    rot = f32(rot)
    volume = f32(rng.standard_normal((n, n, n)))
    images = f32(rng.standard_normal((nb, n, n)))
    p = gold_projection_matrix(n, rot, 3.5)
    out = nc.zeros((nb, n, n))
    nc.project(nc.to_device(volume), nc.to_device(rot), 3.5, out)
    assert rel_err(nc.to_host(out), gold_project(p, volume)) < RTOL
    bp = nc.zeros((n, n, n))
    nc.backproject(nc.to_device(images), nc.to_device(rot), 3.5, bp)
    assert rel_err(nc.to_host(bp), gold_backproject(p, images)) < RTOL


@pytest.mark.parametrize("n", [7, 8])
def test_centre_voxel_lands_on_the_image_centre(n, rng):
    rot = f32(np.concatenate([random_rotations(1, rng), euler_to_matrix(30.0, 60.0, 90.0)[None]]))
    volume = np.zeros((n, n, n), dtype=np.float32)
    volume[n // 2, n // 2, n // 2] = 1.0
    out = nc.zeros((2, n, n))
    nc.project(nc.to_device(volume), nc.to_device(rot), 1.0, out)
    expected = np.zeros((2, n, n), dtype=np.float32)
    expected[:, n // 2, n // 2] = 1.0
    np.testing.assert_array_equal(nc.to_host(out), expected)


def test_conventions_splat_positions():
    # conventions.md 1.3: A(rot=0, tilt=90, psi=0) sends r = (0, 0, 5) to image (x, y) = (-5, 0) and
    # r = (0, 5, 0) to (0, 5) (offsets from the centre; x is the column, y the row); here with 3.
    n = 8
    c = n // 2
    volume = np.zeros((n, n, n), dtype=np.float32)
    volume[c + 3, c, c] = 2.0   # r = (0, 0, 3)
    volume[c, c + 3, c] = 3.0   # r = (0, 3, 0)
    out = nc.zeros((1, n, n))
    nc.project(nc.to_device(volume), nc.to_device(f32(euler_to_matrix(0.0, 90.0, 0.0)[None])), math.inf, out)
    expected = np.zeros((n, n))
    expected[c, c - 3] = 2.0
    expected[c + 3, c] = 3.0
    np.testing.assert_allclose(nc.to_host(out)[0], expected, atol=1e-6)

    # A(30, 60, 90) sends r = (1, 2, 3) to (1.232051, 1.665064): bilinear weights around (5, 5)
    volume = np.zeros((n, n, n), dtype=np.float32)
    volume[c + 3, c + 2, c + 1] = 1.0
    out = nc.zeros((1, n, n))
    nc.project(nc.to_device(volume), nc.to_device(f32(euler_to_matrix(30.0, 60.0, 90.0)[None])), math.inf, out)
    fx, fy = 0.232051, 0.665064
    expected = np.zeros((n, n))
    expected[c + 1, c + 1] = (1 - fx) * (1 - fy)
    expected[c + 1, c + 2] = fx * (1 - fy)
    expected[c + 2, c + 1] = (1 - fx) * fy
    expected[c + 2, c + 2] = fx * fy
    np.testing.assert_allclose(nc.to_host(out)[0], expected, atol=2e-6)


def test_support_radius_limits_both_directions():
    n, radius = 7, 2.0
    c = n // 2
    rot = f32(euler_to_matrix([0.0, 40.0], [0.0, 75.0], [0.0, 10.0]))
    offsets = np.arange(n) - c
    r2 = offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2
    inside = r2 <= radius ** 2
    # every support voxel lands well inside the image, so each image sums to the support size
    out = nc.zeros((2, n, n))
    nc.project(nc.to_device(np.ones((n, n, n), np.float32)), nc.to_device(rot), radius, out)
    np.testing.assert_allclose(nc.to_host(out).sum(axis=(1, 2)), [inside.sum()] * 2, rtol=1e-6)
    bp = nc.zeros((n, n, n))
    nc.backproject(nc.to_device(np.ones((2, n, n), np.float32)), nc.to_device(rot), radius, bp)
    bp = nc.to_host(bp)
    assert np.all(bp[~inside] == 0.0)
    np.testing.assert_allclose(bp[inside], 2.0, rtol=1e-6)  # weights of a splat sum to 1


# ------------------------------------------------------------------------------------------
# Fourier filter


@pytest.mark.parametrize("n", [8, 9, 12, 13])
def test_dft_stage_matrices_reproduce_numpy_fft(n, rng):
    """Host-side: the four dense stage matrices, applied as the kernel does, equal the FFT path."""
    images = rng.standard_normal((3, n, n))
    filters = rng.standard_normal((3, n, n))  # not symmetric: real() must still match

    def stage(pt, y, filt=None, scale=1.0):
        prod = np.einsum("km,bkn->bmn", pt.astype(np.float64), y)        # P @ y[b]
        halves = prod.reshape(len(y), -1, n, n).transpose(0, 1, 3, 2)    # per-half transpose
        if filt is not None:
            halves = halves * filt[:, None]
        return scale * halves.reshape(len(y), -1, n)

    pt1, pt2, pt3, pt4 = fourier.dft_stage_matrices(n)
    assert pt1.shape == (n, 2 * n) and pt2.shape == (2 * n, 2 * n) and pt4.shape == (2 * n, n)
    out = stage(pt4, stage(pt3, stage(pt2, stage(pt1, images), filters)), scale=1.0 / n ** 2)
    assert rel_err(out, gold_fourier_filter(images, filters)) < 1e-6


@pytest.mark.parametrize("n", [8, 9, 12])
def test_fourier_filter_matches_numpy_fft(n, rng):
    images = f32(rng.standard_normal((2, n, n)))
    filters = f32(rng.standard_normal((2, n, n)))
    out = nc.to_device(f32(rng.standard_normal((2, n, n))))  # overwritten, not accumulated
    nc.fourier_filter(nc.to_device(images), nc.to_device(filters), out)
    assert rel_err(nc.to_host(out), gold_fourier_filter(images, filters)) < RTOL


def test_fourier_filter_in_place_and_dot_test(rng):
    # real(ifft2(H fft2 .)) is self-adjoint for any real H: <A x, y> = <x, A y>
    n = 9
    x = f32(rng.standard_normal((2, n, n)))
    y = f32(rng.standard_normal((2, n, n)))
    filters = nc.to_device(ctf_like_filters(n, 2, rng))
    ax = nc.to_device(x)
    nc.fourier_filter(ax, filters, ax)  # in place
    ay = nc.zeros((2, n, n))
    nc.fourier_filter(nc.to_device(y), filters, ay)
    lhs = float(np.vdot(nc.to_host(ax).astype(np.float64), y))
    rhs = float(np.vdot(x.astype(np.float64), nc.to_host(ay)))
    assert abs(lhs - rhs) <= DOT_RTOL * abs(lhs)


def test_dft_stage_kernel_over_several_tiles(rng):
    # N = 20 with M = K = 2N: two row tiles, three K tiles (the last partial), a partial column
    # tile, the half split of the store, the filter and the scale.
    n, nb = 20, 1
    pt = f32(rng.standard_normal((2 * n, 2 * n)))
    y = f32(rng.standard_normal((nb, 2 * n, n)))
    filt = f32(rng.standard_normal((nb, n, n)))
    out = nc.zeros((nb, 2 * n, n))
    fourier._stage(nc.to_device(pt), nc.to_device(y), nc.to_device(filt), 1, 0.5, out)
    prod = np.einsum("km,bkn->bmn", pt.astype(np.float64), y)
    expected = 0.5 * (prod.reshape(nb, 2, n, n).transpose(0, 1, 3, 2) * filt[:, None]).reshape(nb, 2 * n, n)
    assert rel_err(nc.to_host(out), expected) < RTOL


# ------------------------------------------------------------------------------------------
# forward_residual / weighted_backproject


def _problem(n: int, nb: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "rotations": f32(random_rotations(nb, rng)),
        "volume": f32(rng.standard_normal((n, n, n))),
        "filters2": f32(ctf_like_filters(n, nb, rng) ** 2),
        "data": f32(rng.standard_normal((nb, n, n))),
        "data_norm2": f32(rng.uniform(50.0, 80.0, nb)),
        "weights": f32(rng.uniform(0.5, 1.5, nb)),
    }


def _forward_residual(p: dict[str, np.ndarray], volume: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    nb, n = p["data"].shape[:2]
    res = nc.to_device(np.full((nb, n, n), 7.0, np.float32))  # overwritten
    loss = nc.to_device(np.full(nb, 7.0, np.float32))
    nc.forward_residual(nc.to_device(volume), nc.to_device(p["rotations"]), nc.to_device(p["filters2"]),
                        nc.to_device(p["data"]), nc.to_device(p["data_norm2"]), radius, res, loss)
    return nc.to_host(res), nc.to_host(loss)


@pytest.mark.slow
def test_forward_residual_and_weighted_backproject_match_gold(rng):
    n, nb, radius = 8, 2, 3.5
    p = _problem(n, nb, rng)
    pm = gold_projection_matrix(n, p["rotations"], radius)
    q = gold_project(pm, p["volume"])
    s = gold_fourier_filter(q, p["filters2"])
    res, loss = _forward_residual(p, p["volume"], radius)
    assert rel_err(res, s - p["data"]) < RTOL
    loss_gold = np.einsum("bij,bij->b", q, s) - 2 * np.einsum("bij,bij->b", q, p["data"]) + p["data_norm2"]
    np.testing.assert_allclose(loss, loss_gold, rtol=1e-5)

    grad0 = f32(rng.standard_normal((n, n, n)))
    grad = nc.to_device(grad0)
    nc.weighted_backproject(nc.to_device(res), nc.to_device(p["rotations"]), nc.to_device(p["weights"]), radius, grad)
    expected = gold_backproject(pm, res, 2.0 * p["weights"].astype(np.float64))
    assert rel_err(nc.to_host(grad) - grad0, expected) < RTOL


@pytest.mark.slow
def test_gradient_path_trapezoid_identity(rng):
    # L(x) = sum_b w_b loss_b(x) is quadratic in x, so the trapezoid rule is exact:
    # L(x) - L(0) = <grad L(x) + grad L(0), x> / 2. L(0) = sum_b w_b data_norm2[b] and the residual
    # at x = 0 is -data, so this checks forward_residual + weighted_backproject together with one
    # forward call.
    n, nb, radius = 8, 2, 4.0
    p = _problem(n, nb, rng)
    rot = nc.to_device(p["rotations"])
    weights = nc.to_device(p["weights"])
    res, loss = _forward_residual(p, p["volume"], radius)
    grad = nc.zeros((n, n, n))
    nc.weighted_backproject(nc.to_device(res), rot, weights, radius, grad)
    nc.weighted_backproject(nc.to_device(-p["data"]), rot, weights, radius, grad)  # + grad L(0)
    w = p["weights"].astype(np.float64)
    lhs = float(w @ loss) - float(w @ p["data_norm2"])
    rhs = 0.5 * float(np.vdot(nc.to_host(grad).astype(np.float64), p["volume"]))
    assert abs(lhs - rhs) <= DOT_RTOL * abs(rhs)


@pytest.mark.slow
def test_matches_cpu_backend(rng):
    try:
        from numba_recon import cpu
    except ImportError as err:
        pytest.skip(f"numba_recon.cpu is not importable ({err})")
    n, nb, radius = 7, 2, 3.5  # odd box, one brick: cheap in the simulator
    p = _problem(n, nb, rng)
    images = f32(rng.standard_normal((nb, n, n)))
    rot_d = nc.to_device(p["rotations"])

    got = nc.zeros((nb, n, n))
    nc.project(nc.to_device(p["volume"]), rot_d, radius, got)
    ref = np.zeros((nb, n, n), np.float32)
    cpu.project(p["volume"], p["rotations"], radius, ref)
    assert rel_err(nc.to_host(got), ref) < RTOL

    got = nc.zeros((n, n, n))
    nc.backproject(nc.to_device(images), rot_d, radius, got)
    ref = np.zeros((n, n, n), np.float32)
    cpu.backproject(images, p["rotations"], radius, ref)
    assert rel_err(nc.to_host(got), ref) < RTOL

    got = nc.zeros((nb, n, n))
    nc.fourier_filter(nc.to_device(images), nc.to_device(p["filters2"]), got)
    ref = np.zeros((nb, n, n), np.float32)
    cpu.fourier_filter(images, p["filters2"], ref)
    assert rel_err(nc.to_host(got), ref) < RTOL

    res, loss = _forward_residual(p, p["volume"], radius)
    res_ref = np.zeros((nb, n, n), np.float32)
    loss_ref = np.zeros(nb, np.float32)
    cpu.forward_residual(p["volume"], p["rotations"], p["filters2"], p["data"], p["data_norm2"], radius,
                         res_ref, loss_ref)
    assert rel_err(res, res_ref) < RTOL
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)

    got = nc.zeros((n, n, n))
    nc.weighted_backproject(nc.to_device(res), rot_d, nc.to_device(p["weights"]), radius, got)
    ref = np.zeros((n, n, n), np.float32)
    cpu.weighted_backproject(res, p["rotations"], p["weights"], radius, ref)
    assert rel_err(nc.to_host(got), ref) < RTOL


# ------------------------------------------------------------------------------------------
# arguments, memory helpers, target facts


def test_launchers_reject_bad_arguments():
    n = 8
    vol = nc.zeros((n, n, n))
    rot = nc.to_device(np.eye(3, dtype=np.float32)[None])
    out = nc.zeros((1, n, n))
    with pytest.raises(TypeError, match="volume: expected a CUDA device array"):
        nc.project(np.zeros((n, n, n), np.float32), rot, 3.0, out)
    with pytest.raises(TypeError, match="float32"):
        nc.project(nc.to_device(np.zeros((n, n, n)), dtype=None), rot, 3.0, out)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 8, 8\)"):
        nc.project(vol, rot, 3.0, nc.zeros((2, n, n)))
    with pytest.raises(ValueError, match="radius_px must be >= 0"):
        nc.project(vol, rot, -1.0, out)
    with pytest.raises(ValueError, match="threads_per_block"):
        nc.backproject(out, rot, 3.0, vol, threads_per_block=100)
    with pytest.raises(ValueError, match="weights"):
        nc.weighted_backproject(out, rot, nc.zeros(2), 3.0, vol)
    with pytest.raises(ValueError, match="filters"):
        nc.fourier_filter(out, nc.zeros((1, n, n + 1)), out)
    with pytest.raises(ValueError, match="data_norm2"):
        nc.forward_residual(vol, rot, out, out, nc.zeros(3), 3.0, out, nc.zeros(1))


def test_empty_batch_changes_nothing():
    n = 8
    out = nc.to_device(np.ones((n, n, n), np.float32))
    rot = nc.zeros((0, 3, 3))
    empty = nc.zeros((0, n, n))
    nc.project(out, rot, 3.0, empty)
    nc.backproject(empty, rot, 3.0, out)
    nc.weighted_backproject(empty, rot, nc.zeros(0), 3.0, out)
    nc.fourier_filter(empty, empty, empty)
    nc.forward_residual(out, rot, empty, empty, nc.zeros(0), 3.0, empty, nc.zeros(0))
    np.testing.assert_array_equal(nc.to_host(out), 1.0)


def test_memory_helpers():
    big_endian = np.arange(6, dtype=">f8").reshape(2, 3)
    dev = nc.to_device(big_endian)
    host = nc.to_host(dev)
    assert host.dtype == np.float32 and host.dtype.isnative
    np.testing.assert_array_equal(host, big_endian)
    assert nc.to_device(dev) is dev
    z = nc.zeros((3, 4))
    assert nc.to_host(z).shape == (3, 4) and not nc.to_host(z).any()
    memory.fill(z, 2.5)
    nc.synchronize()
    np.testing.assert_array_equal(nc.to_host(z), 2.5)
    a = memory.scratch("test.scratch", (4, 5))
    b = memory.scratch("test.scratch", (2, 3))
    assert a.shape == (4, 5) and b.shape == (2, 3)
    memory.release_scratch()


def test_describe_and_is_available():
    assert nc.is_available() is True
    info = nc.describe()
    assert info["simulator"] is True and info["available"] is True
    assert info["name"] == "SIMULATOR" and info["numba_cuda_version"]
    json.dumps(info)


def test_cuda_is_imported_only_by_the_target_module():
    # a switch to another CUDA target must stay a one-line change in _target.py
    package = Path(nc.__file__).parent
    importers = sorted(p.name for p in package.glob("*.py")
                       if "from numba import cuda" in p.read_text() or "import numba.cuda" in p.read_text())
    assert importers == ["_target.py"]


@pytest.mark.slow
def test_device_check_simulator_smoke(tmp_path):
    out = tmp_path / "device_check.json"
    assert device_check.main(["--simulator-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["simulator"] is True
    checks = result["correctness"]["checks"]
    assert result["correctness"]["passed"] is True and all(c["passed"] for c in checks)
    assert {"dot_project_backproject", "dot_fourier_filter", "gradient_central_difference",
            "centre_voxel"} <= {c["name"] for c in checks}
    assert {row["op"] for row in result["timing"]} == {"project", "backproject", "loss_and_gradient",
                                                       "prepare_particles"}
    assert all(row["images_per_s"] > 0 for row in result["timing"])
    for case in ("global_distinct", "global_512_threads_per_address", "shared_conflict_free"):
        assert result["atomics"][case]["sum_correct"] is True
    assert result["target"]["target_images_per_s"] == device_check.TARGET_IMAGES_PER_S


def test_device_check_full_run_refuses_the_simulator(tmp_path, capsys):
    assert device_check.main(["--out", str(tmp_path / "r.json")]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------------
# the simulator itself


def test_threads_of_a_block_share_one_shared_array_even_when_allocation_is_slow(monkeypatch):
    """``cuda.shared.array`` under the simulator: threads that ask at the same moment get the same
    array (``_target`` makes the look-up and the store one step; without it, each thread that looks
    before the first store gets its own array and never sees what the others write)."""
    import threading
    import time

    from numba.cuda.simulator import kernelapi

    real_empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(0.005)  # widen the window between the look-up and the store
        return real_empty(*args, **kwargs)

    shared = kernelapi.FakeCUDAShared(0)
    start = threading.Barrier(8)
    got = []

    def allocate():
        start.wait()
        got.append(shared.array((4,), np.float32))  # one source line: one array for the block

    monkeypatch.setattr(np, "empty", slow_empty)
    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(a is got[0] for a in got)
    other_line = shared.array((4,), np.float32)
    assert other_line is not got[0]  # another line, another array


@_target.cuda.jit
def _reverse_through_shared_memory(out):
    # the simulator swaps in its fake module for globals named ``cuda`` only
    first = cuda.shared.array(32, np.float32)
    second = cuda.shared.array(32, np.float32)
    t = cuda.threadIdx.x
    first[t] = t
    second[t] = -t
    cuda.syncthreads()
    out[cuda.blockIdx.x, t] = first[31 - t] + 10 * second[31 - t]


def test_a_kernel_sees_what_other_threads_wrote_to_shared_memory():
    out = np.zeros((3, 32), np.float32)
    _reverse_through_shared_memory[3, 32](out)
    expected = np.arange(31, -1, -1, dtype=np.float32) * -9
    assert np.array_equal(out, np.broadcast_to(expected, out.shape))
