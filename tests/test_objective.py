"""The objective and the CG solver's pieces, checked against hand-computed (dense) versions.

- the gridded slice density: exact for axis-aligned slices, equal to a plain-Python gridding for
  rotated ones, and (with the splat's transfer function) a model of the real normal operator
  ``P^T H^2 P`` within a few per cent at every resolution;
- the prior's gradient against finite differences of its value;
- one residual and one CG step of a tiny reconstruction against the objective written out with
  dense matrices (data term, robust weights, noise weights, support and learned prior included);
- the learned prior from an FSC curve, the support estimate, the CUDA twin of the gridding.
"""

from __future__ import annotations

import numpy as np
import pytest

from numba_recon.geometry import euler_to_matrix
from numba_recon.objective import (Objective, estimate_particle_radius, full_to_half, shell_index, soft_sphere,
                                   splat_transfer2)
from numba_recon.step import CGState, cg_direction, cg_step


def _random_rotations(rng: np.random.Generator, k: int) -> np.ndarray:
    rot = rng.uniform(0, 360, k)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, k)))
    psi = rng.uniform(0, 360, k)
    return np.stack([euler_to_matrix(a, b, c) for a, b, c in zip(rot, tilt, psi)]).astype(np.float64)


def _naive_insert(rotations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    nb, n = weights.shape[0], weights.shape[1]
    out = np.zeros((n, n, n))
    freqs = np.rint(np.fft.fftfreq(n) * n).astype(int)
    for b in range(nb):
        for iv, kv in enumerate(freqs):
            for iu, ku in enumerate(freqs):
                q = rotations[b].T @ np.array([ku, kv, 0.0])
                f = np.floor(q)
                t = q - f
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            w = ((t[2] if dz else 1 - t[2]) * (t[1] if dy else 1 - t[1]) * (t[0] if dx else 1 - t[0]))
                            index = ((int(f[2]) + dz) % n, (int(f[1]) + dy) % n, (int(f[0]) + dx) % n)
                            out[index] += w * weights[b, iv, iu]
    return out


def test_insert_identity_rotation_is_exact(rng):
    from numba_recon.cpu import insert_weights

    n = 8
    w = rng.uniform(0.5, 2.0, (1, n, n))
    out = np.zeros((n, n, n))
    insert_weights(np.eye(3)[None], w, out)
    np.testing.assert_allclose(out[0], w[0], rtol=1e-12)  # the kz = 0 plane, [k_v, k_u]
    assert np.abs(out[1:]).max() == 0


@pytest.mark.parametrize("n", [6, 7])
def test_insert_matches_plain_gridding(rng, n):
    from numba_recon.cpu import insert_weights

    rot = _random_rotations(rng, 5)
    w = rng.uniform(0.0, 1.0, (5, n, n))
    out = np.zeros((n, n, n))
    insert_weights(rot, w, out)
    np.testing.assert_allclose(out, _naive_insert(rot, w), rtol=1e-10, atol=1e-12)
    # float32 accumulation agrees to float32 rounding
    out32 = np.zeros((n, n, n), np.float32)
    insert_weights(rot.astype(np.float32), w.astype(np.float32), out32)
    np.testing.assert_allclose(out32, out, rtol=1e-5, atol=1e-5)


def test_insert_cuda_simulator_matches_cpu(rng, make_backend):
    from numba_recon.cpu import insert_weights

    cuda = make_backend("cuda")
    n = 6
    rot = _random_rotations(rng, 3).astype(np.float32)
    w = rng.uniform(0.0, 1.0, (3, n, n)).astype(np.float32)
    ref = np.zeros((n, n, n), np.float32)
    insert_weights(rot, w, ref)
    out = cuda.zeros((n, n, n))
    cuda.insert_weights(cuda.to_device(rot), cuda.to_device(w), out)
    np.testing.assert_allclose(cuda.to_host(out), ref, rtol=2e-6, atol=1e-6)


def test_kernel_models_the_normal_operator(rng):
    """``N * K`` (gridded, with the splat transfer) against ``P^T P`` applied to white noise: the
    shell-wise ratio stays within 15 % of 1 from low resolution to 0.9 Nyquist."""
    from numba_recon.cpu import backproject, insert_weights, project

    n, k = 32, 300
    rot = _random_rotations(rng, k).astype(np.float32)
    radius = n // 2 - 1
    v = (rng.standard_normal((n, n, n)) * soft_sphere(n, radius - 3, 3)).astype(np.float32)
    img = np.zeros((k, n, n), np.float32)
    project(v, rot, radius, img)
    av = np.zeros((n, n, n), np.float32)
    backproject(img, rot, radius, av)
    kern = np.zeros((n, n, n))
    insert_weights(rot, np.broadcast_to(splat_transfer2(n), (k, n, n)).copy(), kern)
    kern = full_to_half(kern) * n
    fv = np.fft.rfftn(v, norm="ortho")
    fav = np.fft.rfftn(av, norm="ortho")
    shells = shell_index(n)
    for s in range(3, int(0.9 * n / 2)):
        sel = shells == s
        ratio = np.sum((fav[sel] * np.conj(fv[sel])).real) / np.sum(kern[sel] * np.abs(fv[sel]) ** 2)
        assert abs(ratio - 1.0) < 0.15, (s, ratio)


def test_full_to_half_is_hermitian_even(rng):
    n = 6
    k = rng.uniform(size=(n, n, n))
    half = full_to_half(k)
    v = rng.standard_normal((n, n, n))
    out = np.fft.irfftn(half * np.fft.rfftn(v), s=v.shape, axes=(0, 1, 2))
    full_even = 0.5 * (k + np.roll(k[::-1, ::-1, ::-1], 1, axis=(0, 1, 2)))
    ref = np.fft.ifftn(full_even * np.fft.fftn(v))
    np.testing.assert_allclose(out, ref.real, atol=1e-12)
    assert np.abs(ref.imag).max() < 1e-12


def _tiny_objective(rng, n=8):
    mask = soft_sphere(n, 2.0, 1.5)
    kernels = rng.uniform(0.5, 2.0, (2, n, n, n // 2 + 1))
    obj = Objective.create(n, mask, kernels, reg_lambda=0.1)
    obj.inv_tau2[:] = rng.uniform(0.0, 3.0, obj.inv_tau2.shape)
    return obj


def test_prior_gradient_matches_finite_differences(rng):
    obj = _tiny_objective(rng)
    v = rng.standard_normal((8, 8, 8))
    d = rng.standard_normal((8, 8, 8))
    eps = 1e-5
    numeric = (obj.prior_value(v + eps * d, 1) - obj.prior_value(v - eps * d, 1)) / (2 * eps)
    analytic = 2.0 * float(np.vdot(obj.prior_term(v, 1), d))
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_preconditioner_is_symmetric_positive(rng):
    obj = _tiny_objective(rng)
    a, b = rng.standard_normal((2, 8, 8, 8))
    assert float(np.vdot(a, obj.precondition(b, 0))) == pytest.approx(float(np.vdot(obj.precondition(a, 0), b)),
                                                                      rel=1e-10)
    assert float(np.vdot(a, obj.precondition(a, 0))) > 0


def _dense(fn, n):
    """The matrix of a linear map of (n, n, n) volumes."""
    cols = []
    for j in range(n**3):
        e = np.zeros(n**3)
        e[j] = 1.0
        cols.append(np.ravel(fn(e.reshape(n, n, n))))
    return np.stack(cols, axis=1)


def test_one_cg_step_against_the_dense_objective(rng):
    """Residual, step length and new iterate of one CG step on a tiny problem, compared with the
    objective written out with dense matrices: data term with CTFs, noise and robust weights,
    support mask and learned prior."""
    from numba_recon.cpu import backproject, forward_residual, project

    n, k = 8, 12
    radius = 3.5
    rot = _random_rotations(rng, k)
    ctf2 = rng.uniform(0.2, 1.0, (k, n, n))
    ctf2 = 0.5 * (ctf2 + np.roll(ctf2[:, ::-1, ::-1], 1, axis=(1, 2)))  # even, as CTFs are
    images = rng.standard_normal((k, n, n))
    h = np.sqrt(ctf2)
    data = np.stack([np.fft.ifft2(h[i] * np.fft.fft2(images[i])).real for i in range(k)])  # H b
    w = rng.uniform(0.2, 1.0, k) / rng.uniform(0.5, 2.0, k)  # robust weight / sigma^2
    obj = _tiny_objective(rng, n)
    hpart = 0
    m = obj.mask

    def data_residual_backprojected(x: np.ndarray) -> np.ndarray:
        res = np.zeros((k, n, n))
        forward_residual(x, rot, ctf2, data, np.zeros(k), radius, res, np.zeros(k))
        out = np.zeros((n, n, n))
        backproject(-w[:, None, None] * res, rot, radius, out)  # sum w P^T (H b - H^2 P x)
        return out

    # dense objective: F(v) = sum_i w_i ||H P m v - b||^2 + prior(v)
    def model(i):
        def fn(vol):
            img = np.zeros((1, n, n))
            project(m * vol, rot[i:i + 1], radius, img)
            return np.fft.ifft2(h[i] * np.fft.fft2(img[0])).real
        return _dense(fn, n)

    mats = [model(i) for i in range(k)]
    prior = _dense(lambda vol: obj.prior_term(vol, hpart), n)  # (1/2) Hessian of the prior
    hess = sum(w[i] * mats[i].T @ mats[i] for i in range(k)) + prior
    rhs = sum(w[i] * mats[i].T @ images[i].ravel() for i in range(k))

    v = rng.standard_normal((n, n, n)) * 0.1
    r_dense = rhs - hess @ v.ravel()
    r = obj.residual(data_residual_backprojected(m * v), v, hpart)
    np.testing.assert_allclose(r.ravel(), r_dense, rtol=1e-8, atol=1e-10 * np.abs(r_dense).max())

    # one CG step from v along the preconditioned residual
    z = obj.precondition(r, hpart)
    state = CGState(v=np.stack([v, v]).astype(np.float64), r=np.stack([r, r]), p=np.stack([z, z]),
                    rz=np.array([np.vdot(r, z)] * 2), exact=True)
    trial = state.trial(hpart)
    r_trial = obj.residual(data_residual_backprojected(m * trial), trial, hpart)
    alpha = cg_step(state, hpart, r_trial)
    alpha_dense = float(np.vdot(r_dense, z.ravel()) / np.vdot(z.ravel(), hess @ z.ravel()))
    assert alpha == pytest.approx(alpha_dense, rel=1e-8)
    v_new = v.ravel() + alpha_dense * z.ravel()
    np.testing.assert_allclose(state.v[hpart].ravel(), v_new, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(state.r[hpart].ravel(), rhs - hess @ v_new, rtol=1e-7,
                               atol=1e-9 * np.abs(r_dense).max())
    # the step is the exact minimiser along z: the new residual is orthogonal to it
    assert abs(np.vdot(state.r[hpart].ravel(), z.ravel())) < 1e-8 * np.linalg.norm(r_dense) * np.linalg.norm(z)
    # and the next direction is conjugate to the previous one when not restarted
    z_new = obj.precondition(state.r[hpart], hpart)
    cg_direction(state, hpart, z_new, restart=False)
    assert abs(np.vdot(state.p[hpart].ravel(), hess @ z.ravel())) < 1e-8 * np.abs(hess @ z.ravel()).sum()


def test_changed_objective_takes_the_trial_point(rng):
    n = 4
    r = rng.standard_normal((2, n, n, n))
    p = rng.standard_normal((2, n, n, n))
    state = CGState(np.zeros((2, n, n, n)), r.copy(), p.copy(), np.ones(2), exact=False)
    r_trial = rng.standard_normal((n, n, n))
    assert cg_step(state, 0, r_trial) == 1.0
    np.testing.assert_array_equal(state.v[0], p[0])
    np.testing.assert_array_equal(state.r[0], r_trial)


def test_learned_prior_follows_the_fsc():
    n = 8
    kernels = np.ones((2, n, n, n // 2 + 1)) * 4.0
    obj = Objective.create(n, np.ones((n, n, n)), kernels)
    curve = np.array([1.0, 0.9, 0.5, 0.2, 0.0])
    obj.update_prior(curve)
    # 1/tau^2 = <K> (1 - FSC) / FSC; DC unregularised; FSC clipped at 1e-3
    expected = 4.0 * (1 - np.clip(curve, 1e-3, 0.999)) / np.clip(curve, 1e-3, 0.999)
    expected[0] = 0.0
    np.testing.assert_allclose(obj.inv_tau2[0], expected)
    np.testing.assert_allclose(obj.inv_tau2[1], expected)
    assert np.isinf(obj.tau2(0)[0]) and obj.tau2(0)[1] == pytest.approx(1 / expected[1])


def test_support_estimate_is_generous_but_close():
    """A blob of radius ~10 px in a box of 48: the estimate covers it but is well inside the box."""
    n = 48
    c = n // 2
    z, y, x = np.ogrid[:n, :n, :n]
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2)
    vol = np.exp(-0.5 * (np.maximum(r - 8.0, 0) / 1.0) ** 2)
    vol += np.random.default_rng(0).normal(0, 0.02, vol.shape)
    est = estimate_particle_radius(vol, n // 2 - 6)
    assert 10.0 <= est <= 14.0, est
