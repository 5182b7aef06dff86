"""The forward and adjoint stages: the CTF-wrapped operator, the gradient, the physics of P."""

from __future__ import annotations


import numpy as np
import pytest

from numba_recon import adjoint, forward
from numba_recon.backend import get_backend
from numba_recon.geometry import random_rotations

#: the CTFs of these tests: B-factor 20 A^2, and their even part, so that ``filters2 = H^2`` is exactly
#: the square of the filter that ``H`` applies (see conftest's ``even_part`` and ``random_ctfs``)
CTF = {"bfactor_angstrom2": 20.0, "even": True}


def _tol(dtype) -> float:
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


def test_default_radius():
    assert forward.default_radius_px(128) == 63.0
    assert forward.default_radius_px(129) == 63.0
    assert forward.default_radius_px(2) == 0.0
    with pytest.raises(ValueError):
        forward.default_radius_px(1)


@pytest.mark.parametrize(("backend", "dtype", "n"), [
    ("cpu", np.float64, 16), ("cpu", np.float64, 17), ("cpu", np.float32, 16), ("cpu", np.float32, 17),
    ("cuda", np.float32, 8),
], indirect=["backend"])
def test_ctf_operator_dot_test(backend, dtype, n, random_ctfs):
    """<H P x, y> = <x, (H P)^T y> with real CTFs and random rotations."""
    be = backend
    rng = np.random.default_rng(n + 100)
    b = 2 if be.name == "cuda" else 4
    rotations = random_rotations(b, rng)
    h = random_ctfs(rng, b, n, **CTF)
    x = rng.standard_normal((n, n, n))
    y = rng.standard_normal((b, n, n))
    # backend arrays in (host arrays in: the gradient-path test below)
    rot, filt = be.to_device(rotations, dtype), be.to_device(h, dtype)
    hpx = forward.model_images(be, be.to_device(x, dtype), rot, filt, dtype=dtype).astype(np.float64)
    hty = adjoint.backproject_filtered(be, be.to_device(y, dtype), rot, filt, dtype=dtype).astype(np.float64)
    lhs = np.vdot(hpx, y)
    rhs = np.vdot(x, hty)
    assert abs(lhs - rhs) <= _tol(dtype) * abs(lhs)


@pytest.mark.parametrize(("backend", "dtype", "n"), [
    ("cpu", np.float64, 14), ("cpu", np.float64, 15), ("cpu", np.float32, 14), ("cpu", np.float32, 15),
    pytest.param("cuda", np.float32, 8, marks=pytest.mark.slow),
], indirect=["backend"])
def test_gradient_path_is_twice_the_adjoint_of_the_residual(backend, dtype, n, random_ctfs):
    """forward_residual + weighted_backproject give loss_b = ||H_b P_b x - b'_b||^2 and
    grad = 2 sum_b w_b (H_b P_b)^T (H_b P_b x - b'_b), checked through <grad, y> for a random y."""
    be = backend
    rng = np.random.default_rng(n + 200)
    b = 2 if be.name == "cuda" else 4
    radius = forward.default_radius_px(n)
    rotations = random_rotations(b, rng)
    h = random_ctfs(rng, b, n, **CTF)
    x = rng.standard_normal((n, n, n))
    target = rng.standard_normal((b, n, n))  # b' = T^{-1} b
    weights = rng.uniform(0.2, 2.0, b)
    data = np.real(np.fft.ifft2(h * np.fft.fft2(target)))  # H b'

    rot = be.to_device(rotations, dtype)
    resid = be.zeros((b, n, n), dtype)
    loss = be.zeros((b,), dtype)
    forward.forward_residual(be, be.to_device(x, dtype), rot, be.to_device(h * h, dtype), be.to_device(data, dtype),
                             be.to_device((target**2).sum(axis=(1, 2)), dtype), radius, resid, loss)
    grad = be.zeros((n, n, n), dtype)
    adjoint.weighted_backproject(be, resid, rot, be.to_device(weights, dtype), radius, grad)

    hpx = forward.model_images(be, x, rotations, h, radius, dtype=dtype).astype(np.float64)
    np.testing.assert_allclose(be.to_host(loss), ((hpx - target) ** 2).sum(axis=(1, 2)), rtol=_tol(dtype))
    y = rng.standard_normal((n, n, n))
    hpy = forward.model_images(be, y, rotations, h, radius, dtype=dtype).astype(np.float64)
    lhs = np.vdot(be.to_host(grad).astype(np.float64), y)
    rhs = 2.0 * np.sum(weights * np.einsum("bij,bij->b", hpx - target, hpy))
    assert abs(lhs - rhs) <= _tol(dtype) * abs(rhs)


def test_gradient_matches_finite_differences(random_ctfs):
    """<grad L, d> = (L(x + e d) - L(x - e d)) / (2 e) for L(x) = sum_b w_b loss_b(x), float64."""
    be = get_backend("cpu")
    rng = np.random.default_rng(7)
    n, b = 10, 3
    radius = forward.default_radius_px(n)
    rotations = random_rotations(b, rng)
    h = random_ctfs(rng, b, n, **CTF)
    target = rng.standard_normal((b, n, n))
    data = np.ascontiguousarray(np.real(np.fft.ifft2(h * np.fft.fft2(target))))
    norm2 = (target**2).sum(axis=(1, 2))
    weights = rng.uniform(0.5, 1.5, b)

    def loss_and_grad(x):
        resid = np.zeros((b, n, n))
        loss = np.zeros(b)
        forward.forward_residual(be, x, rotations, h * h, data, norm2, radius, resid, loss)
        grad = np.zeros((n, n, n))
        adjoint.weighted_backproject(be, resid, rotations, weights, radius, grad)
        return float(np.dot(weights, loss)), grad

    x = rng.standard_normal((n, n, n))
    d = rng.standard_normal((n, n, n))
    _, grad = loss_and_grad(x)
    eps = 1e-3
    numeric = (loss_and_grad(x + eps * d)[0] - loss_and_grad(x - eps * d)[0]) / (2 * eps)
    assert np.vdot(grad, d) == pytest.approx(numeric, rel=1e-8)


def test_gaussian_blob_projects_to_its_analytic_projection():
    """A 3D Gaussian (sigma s px, amplitude a) sampled at voxel centres around p projects to
    a sqrt(2 pi) s exp(-d^2 / (2 s^2)) around (A p)_xy + N // 2.

    Bilinear splatting conserves each voxel's mass and centroid, so the image's total and
    centroid match the analytic ones to rounding. Its shape is the analytic one blurred by the
    splat (a tent of variance f (1 - f) for sub-pixel offset f): at box 64 with s = 2 px the
    relative L2 error is 2.8 to 3.4 % (1.3 to 1.5 % at s = 3, 5 to 6 % at s = 1.5).
    """
    be = get_backend("cpu")
    n, s, a = 64, 2.0, 2.0
    c = n // 2
    p = np.array([3.0, -2.0, 4.0])  # off-centre, unequal per axis: a transposed axis would show
    d = np.arange(n) - c
    z, y, x = np.meshgrid(d, d, d, indexing="ij")
    volume = a * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    rotations = random_rotations(3, np.random.default_rng(7))
    images = forward.model_images(be, volume, rotations, None, dtype=np.float64)
    rows, cols = np.meshgrid(d, d, indexing="ij")
    for img, rot in zip(images, rotations):
        qx, qy = (rot @ p)[:2]
        analytic = a * np.sqrt(2 * np.pi) * s * np.exp(-((cols - qx) ** 2 + (rows - qy) ** 2) / (2 * s * s))
        assert img.sum() == pytest.approx(a * (2 * np.pi) ** 1.5 * s**3, rel=1e-9)
        assert (img * cols).sum() / img.sum() == pytest.approx(qx, abs=1e-9)
        assert (img * rows).sum() / img.sum() == pytest.approx(qy, abs=1e-9)
        assert np.linalg.norm(img - analytic) / np.linalg.norm(analytic) < 0.04


def test_model_images_batches_and_plain_projection(random_ctfs):
    be = get_backend("cpu")
    rng = np.random.default_rng(9)
    n, b = 12, 5
    rotations = random_rotations(b, rng)
    x = rng.standard_normal((n, n, n)).astype(np.float32)
    whole = forward.model_images(be, x, rotations, None, 4.0)
    chunked = forward.model_images(be, x, rotations, None, 4.0, batch_size=2)
    np.testing.assert_array_equal(whole, chunked)
    direct = np.zeros((b, n, n), np.float32)
    be.project(x, be.to_device(rotations), 4.0, direct)
    np.testing.assert_array_equal(whole, direct)
    h = random_ctfs(rng, b, n, **CTF)
    y = rng.standard_normal((b, n, n)).astype(np.float32)
    np.testing.assert_array_equal(adjoint.backproject_filtered(be, y, rotations, h, batch_size=2),
                                  adjoint.backproject_filtered(be, y, rotations, h, batch_size=5))
    with pytest.raises(ValueError, match="filters"):
        forward.model_images(be, x, rotations, h[:2])
