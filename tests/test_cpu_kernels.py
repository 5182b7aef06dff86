"""The projector kernels against the conventions and against their own adjoint.

Every test runs on the CPU backend and, where marked, on the CUDA backend too (Numba's CUDA
simulator under pytest, a real GPU with ``NUMBA_RECON_TEST_REAL_GPU=1``). Simulator cases stay at
box <= 12 and batch <= 2 because the simulator runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from numba_recon import cpu
from numba_recon.cpu import _support
from numba_recon.geometry import euler_to_matrix, random_rotations






def _project(be, volume, rotations, radius_px, dtype=np.float32):
    out = be.zeros((len(rotations), volume.shape[0], volume.shape[0]), dtype)
    be.project(be.to_device(volume, dtype), be.to_device(rotations, dtype), radius_px, out)
    return be.to_host(out).astype(np.float64)


def _backproject(be, images, rotations, radius_px, dtype=np.float32):
    n = images.shape[-1]
    out = be.zeros((n, n, n), dtype)
    be.backproject(be.to_device(images, dtype), be.to_device(rotations, dtype), radius_px, out)
    return be.to_host(out).astype(np.float64)


def _tol(dtype) -> float:
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


# --- conventions --------------------------------------------------------------------------------

# conventions.md section 1.3: (rot, tilt, psi) degrees, voxel offset r = (x, y, z), image (x, y)
SPLAT_TABLE = [
    ((90.0, 0.0, 0.0), (5, 0, 0), (0.0, -5.0)),
    ((0.0, 0.0, 90.0), (5, 0, 0), (0.0, -5.0)),
    ((0.0, 90.0, 0.0), (0, 0, 5), (-5.0, 0.0)),
    ((0.0, 90.0, 0.0), (0, 5, 0), (0.0, 5.0)),
    ((30.0, 60.0, 90.0), (1, 2, 3), (1.232051, 1.665064)),
]


def _bilinear_image(n: int, u: float, v: float) -> np.ndarray:
    """A unit value splatted at column ``u``, row ``v`` with bilinear weights."""
    img = np.zeros((n, n))
    u0, v0 = math.floor(u), math.floor(v)
    fu, fv = u - u0, v - v0
    for dv, wv in ((0, 1 - fv), (1, fv)):
        for du, wu in ((0, 1 - fu), (1, fu)):
            if 0 <= v0 + dv < n and 0 <= u0 + du < n:  # a zero-weight corner may fall outside
                img[v0 + dv, u0 + du] += wv * wu
    return img


@pytest.mark.parametrize(("backend", "n"), [("cpu", 12), ("cpu", 13), pytest.param("cuda", 12, marks=pytest.mark.slow)],
                         indirect=["backend"])
def test_splat_table_positions(backend, n):
    be = backend
    c = n // 2
    voxels = sorted({row[1] for row in SPLAT_TABLE})
    if be.name == "cuda":
        voxels = [(5, 0, 0)]  # its two table rows in one simulator call
    for voxel in voxels:
        rows = [row for row in SPLAT_TABLE if row[1] == voxel]
        volume = np.zeros((n, n, n))
        x, y, z = voxel
        volume[c + z, c + y, c + x] = 1.0
        rotations = np.stack([euler_to_matrix(*angles) for angles, _, _ in rows])
        images = _project(be, volume, rotations, n // 2 - 1)
        for img, (_, _, (ix, iy)) in zip(images, rows):
            u, v = c + ix, c + iy
            assert img.sum() == pytest.approx(1.0, abs=1e-6)
            cols, rws = np.meshgrid(np.arange(n), np.arange(n), indexing="xy")
            assert (img * cols).sum() == pytest.approx(u, abs=1e-5)
            assert (img * rws).sum() == pytest.approx(v, abs=1e-5)
            np.testing.assert_allclose(img, _bilinear_image(n, u, v), atol=1e-5)


@pytest.mark.parametrize(("backend", "n", "count"),
                         [("cpu", 16, 100), ("cpu", 17, 100), ("cuda", 8, 2), ("cuda", 9, 2)],
                         indirect=["backend"])
def test_centre_voxel_projects_to_image_centre(backend, n, count):
    be = backend
    c = n // 2
    volume = np.zeros((n, n, n))
    volume[c, c, c] = 1.0
    images = _project(be, volume, random_rotations(count, np.random.default_rng(n)), n // 2 - 1)
    centre = np.zeros((n, n))
    centre[c, c] = 1.0
    for img in images:
        np.testing.assert_allclose(img, centre, atol=1e-6)


# --- adjoint ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "dtype", "n", "radius"), [
    ("cpu", np.float64, 16, None), ("cpu", np.float64, 17, None), ("cpu", np.float64, 15, math.inf),
    ("cpu", np.float32, 16, None), ("cpu", np.float32, 17, None),
    ("cuda", np.float32, 8, None), pytest.param("cuda", np.float32, 9, None, marks=pytest.mark.slow),
], indirect=["backend"])
def test_backproject_is_adjoint_of_project(backend, dtype, n, radius):
    """<P x, y> = <x, P^T y>; radius inf includes the box corners, whose splats leave the image."""
    be = backend
    rng = np.random.default_rng(n)
    b = 2 if be.name == "cuda" else 5
    radius = n // 2 - 1 if radius is None else radius
    rotations = random_rotations(b, rng)
    x = rng.standard_normal((n, n, n)).astype(dtype)
    y = rng.standard_normal((b, n, n)).astype(dtype)
    px = _project(be, x, rotations, radius, dtype)
    pty = _backproject(be, y, rotations, radius, dtype)
    lhs = np.vdot(px, y.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), pty)
    assert abs(lhs - rhs) <= _tol(dtype) * abs(lhs)


@pytest.mark.parametrize("n", [12, 13])
def test_support_sphere_and_dropped_corners(n):
    """A back-projected image of ones fills exactly the support sphere with the batch size; with
    an infinite radius the box corners, whose splats leave the image, get less."""
    b = 3
    rotations = random_rotations(b, np.random.default_rng(1))
    ones = np.ones((b, n, n))
    c = n // 2
    d = np.arange(n) - c
    r2 = d[:, None, None] ** 2 + d[None, :, None] ** 2 + d[None, None, :] ** 2
    for radius in (n // 2 - 1, 3.5, 0.0):
        out = np.zeros((n, n, n))
        cpu.backproject(ones, rotations, radius, out)
        np.testing.assert_allclose(out, np.where(r2 <= radius**2, float(b), 0.0), atol=1e-12)
    out = np.zeros((n, n, n))
    cpu.backproject(ones, rotations, math.inf, out)
    inner = r2 <= (n // 2 - 1) ** 2
    np.testing.assert_allclose(out[inner], float(b), atol=1e-12)
    assert out.min() >= 0.0 and out.max() <= b + 1e-12
    assert out[~inner].min() < b - 0.5  # some corner splats leave every image


@pytest.mark.parametrize("n", [7, 12, 13])
def test_row_ranges_match_the_sphere(n):
    c = n // 2
    d = np.arange(n) - c
    r2 = d[:, None, None] ** 2 + d[None, :, None] ** 2 + d[None, None, :] ** 2
    for radius in (0.0, 1.0, 2.5, n // 2 - 1, n / 2, 100.0, math.inf):
        x_lo, x_hi = _support.row_ranges(n, _support.support_limit(radius, n))
        xs = np.arange(n)
        mask = (xs[None, None, :] >= x_lo[:, :, None]) & (xs[None, None, :] <= x_hi[:, :, None])
        np.testing.assert_array_equal(mask, r2 <= radius**2)
        pad = _support.image_padding(n, _support.support_limit(radius, n))
        reach = math.sqrt(min(radius**2, 3 * c * c))
        assert pad >= 1 and c - reach + pad >= 1 and c + reach + 2 < n + 2 * pad


# --- Fourier filter and residuals ---------------------------------------------------------------

@pytest.mark.parametrize(("backend", "dtype", "n"), [
    ("cpu", np.float64, 16), ("cpu", np.float64, 17), ("cpu", np.float32, 17), ("cuda", np.float32, 8),
], indirect=["backend"])
def test_fourier_filter_matches_fft2(backend, dtype, n, even_part, random_ctfs):
    be = backend
    rng = np.random.default_rng(n)
    b = 2
    images = rng.standard_normal((b, n, n))
    # random real filters with H(-k) = H(k), and raw CTFs: not even on the Nyquist lines of an even
    # box, which the contract's real(ifft2(...)) still defines
    for filters in (even_part(rng.standard_normal((b, n, n))), random_ctfs(rng, b, n)):
        expected = np.real(np.fft.ifft2(filters * np.fft.fft2(images)))
        out = be.zeros((b, n, n), dtype)
        be.fourier_filter(be.to_device(images, dtype), be.to_device(filters, dtype), out)
        got = be.to_host(out)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=(1e-5 if dtype == np.float32 else 1e-12) * scale)


@pytest.mark.parametrize(("backend", "dtype", "n"), [
    ("cpu", np.float64, 14), ("cpu", np.float32, 15), pytest.param("cuda", np.float32, 8, marks=pytest.mark.slow),
], indirect=["backend"])
def test_forward_residual_matches_direct_computation(backend, dtype, n, random_ctfs):
    """loss = ||H P x - b'||^2 and residual = H (H P x - b'), computed here with numpy FFTs.

    Both identities need ``filters2 = H^2`` to be the square of the filter H applies, so H is
    made exactly even (see the ``even_part`` fixture).
    """
    be = backend
    rng = np.random.default_rng(3)
    b = 2
    radius = n // 2 - 1
    rotations = random_rotations(b, rng)
    x = rng.standard_normal((n, n, n))
    h = random_ctfs(rng, b, n, even=True)
    target = rng.standard_normal((b, n, n))  # b' = T^{-1} b

    def filt(img, f):
        return np.real(np.fft.ifft2(f * np.fft.fft2(img)))

    data = filt(target, h)
    resid = be.zeros((b, n, n), dtype)
    loss = be.zeros((b,), dtype)
    be.forward_residual(be.to_device(x, dtype), be.to_device(rotations, dtype), be.to_device(h * h, dtype),
                        be.to_device(data, dtype), be.to_device((target**2).sum(axis=(1, 2)), dtype), radius,
                        resid, loss)
    hpx = filt(_project(be, x, rotations, radius, dtype), h)
    expected_loss = ((hpx - target) ** 2).sum(axis=(1, 2))
    expected_resid = filt(hpx - target, h)
    tol = _tol(dtype)
    np.testing.assert_allclose(be.to_host(loss), expected_loss, rtol=tol)
    np.testing.assert_allclose(be.to_host(resid), expected_resid, atol=tol * np.abs(expected_resid).max())


def test_losses_are_summed_in_float64(random_ctfs):
    """float32 images, float64 sums: the loss equals the float64 evaluation of its formula on the
    same float32 arrays to 1e-12 of its terms (float32 sums would be off by about 1e-6)."""
    n, b = 24, 2
    rng = np.random.default_rng(5)
    rotations = random_rotations(b, rng)
    x = rng.standard_normal((n, n, n)).astype(np.float32)
    filters2 = (random_ctfs(rng, b, n) ** 2).astype(np.float32)
    data = rng.standard_normal((b, n, n)).astype(np.float32)
    norm2 = rng.random(b) * 1e3
    resid = np.zeros((b, n, n), np.float32)
    loss = np.zeros(b, np.float64)
    cpu.forward_residual(x, rotations, filters2, data, norm2, n // 2 - 1, resid, loss)
    q = np.zeros((b, n, n), np.float32)
    cpu.project(x, rotations, n // 2 - 1, q)
    s = np.zeros((b, n, n), np.float32)
    cpu.fourier_filter(q, filters2, s)
    q64, s64, d64 = (a.astype(np.float64) for a in (q, s, data))
    qs, qd = (q64 * s64).sum(axis=(1, 2)), (q64 * d64).sum(axis=(1, 2))
    np.testing.assert_allclose(loss, qs - 2 * qd + norm2, rtol=0, atol=1e-12 * (np.abs(qs) + np.abs(qd)).max())
    np.testing.assert_array_equal(resid, s - data)


# --- determinism and argument checks ------------------------------------------------------------

def test_results_do_not_depend_on_thread_count(random_ctfs):
    threads = numba.config.NUMBA_NUM_THREADS
    if threads < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2 to compare thread counts")
    n, b = 18, 3
    rng = np.random.default_rng(11)
    rotations = random_rotations(b, rng).astype(np.float32)
    x = rng.standard_normal((n, n, n)).astype(np.float32)
    images = rng.standard_normal((b, n, n)).astype(np.float32)
    filters2 = np.abs(random_ctfs(rng, b, n)).astype(np.float32) ** 2
    norm2 = rng.random(b)
    weights = rng.random(b)

    def run():
        q = np.zeros((b, n, n), np.float32)
        cpu.project(x, rotations, n // 2 - 1, q)
        g = np.zeros((n, n, n), np.float32)
        cpu.backproject(images, rotations, n // 2 - 1, g)
        resid = np.zeros((b, n, n), np.float32)
        loss = np.zeros(b)
        cpu.forward_residual(x, rotations, filters2, images, norm2, n // 2 - 1, resid, loss)
        grad = np.zeros((n, n, n), np.float32)
        cpu.weighted_backproject(resid, rotations, weights, n // 2 - 1, grad)
        return q, g, resid, loss, grad

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(threads)
        many = run()
    finally:
        numba.set_num_threads(before)
    for a, b_ in zip(one, many):
        np.testing.assert_array_equal(a, b_)


def test_kernels_reject_bad_arguments():
    n = 8
    vol = np.zeros((n, n, n), np.float32)
    rot = np.eye(3)[None]
    out = np.zeros((1, n, n), np.float32)
    with pytest.raises(ValueError, match="out: expected shape"):
        cpu.project(vol, rot, 3, np.zeros((2, n, n), np.float32))
    with pytest.raises(TypeError, match="out: expected float32"):
        cpu.project(vol, rot, 3, out.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu.project(np.zeros((n, n, 2 * n), np.float32)[:, :, ::2], rot, 3, out)
    with pytest.raises(ValueError, match="cubic"):
        cpu.backproject(out, rot, 3, np.zeros((n, n, n + 1), np.float32))
    with pytest.raises(ValueError, match="not rotation matrices"):
        cpu.project(vol, 2 * rot, 3, out)
    with pytest.raises(ValueError, match="NaN"):
        cpu.project(vol, np.full((1, 3, 3), np.nan), 3, out)
    with pytest.raises(ValueError, match="radius_px"):
        cpu.project(vol, rot, -1.0, out)
    with pytest.raises(ValueError, match="weights"):
        cpu.weighted_backproject(out, rot, np.ones(2), 3, vol)


def test_memory_helpers():
    a = np.arange(6, dtype=">f8").reshape(2, 3)[:, ::2]
    d = cpu.to_device(a)
    assert d.dtype == np.float32 and d.flags.c_contiguous and d.dtype.isnative
    np.testing.assert_array_equal(d, [[0, 2], [3, 5]])
    assert cpu.to_device(a, None).dtype == np.float64
    h = cpu.to_host(d)
    h[0, 0] = 99
    assert d[0, 0] == 0  # to_host copies, like a device-to-host transfer
    z = cpu.zeros((2, 3), np.float64)
    assert z.dtype == np.float64 and not z.any()
    cpu.synchronize()
