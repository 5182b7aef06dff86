"""The shared kernel geometry (:mod:`numba_recon.kernel_geometry`): known values, the partitions of
unity of the interpolation weights, and the same numbers from Python, from ``@njit`` code and from a
CUDA kernel (the simulator here; a real GPU with ``NUMBA_RECON_TEST_REAL_GPU=1``)."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from numba_recon import kernel_geometry as kg
from numba_recon.cuda._target import SIMULATOR, cuda, inline_device_functions, is_available
from numba_recon.geometry import random_rotations


@pytest.fixture
def rot(rng) -> np.ndarray:
    return random_rotations(4, rng)


def test_the_box_centre_lands_on_the_image_centre(rot):
    for n in (7, 8, 64):
        c = n // 2
        for b in range(len(rot)):
            assert kg.image_position(*kg.image_rows(rot, b), 0.0, 0.0, 0.0, c) == (c, c)


def test_image_position_is_the_first_two_rows_of_a_r_plus_c(rot, rng):
    r = rng.uniform(-10, 10, 3)
    for b in range(len(rot)):
        u, v = kg.image_position(*kg.image_rows(rot, b), *r, 5)
        np.testing.assert_allclose((u, v), rot[b, :2] @ r + 5, rtol=0, atol=1e-12)


def test_the_row_walk_reaches_the_same_positions(rot):
    n, pad = 24, 8
    c, w, right, below, below_right = kg.padded_frame(n, pad)
    assert (c, w, right, below, below_right) == (12, 40, 1, 40, 41)
    a00, a01, a02, a10, a11, a12 = kg.image_rows(rot, 0)
    origin = float(c + pad)
    row_u, row_v = kg.row_start(a01, a02, a11, a12, 3.0, -2.0, origin)
    for dx in (-5.0, 0.0, 4.0):
        idx, fu, fv = kg.row_corner(row_u, row_v, a00, a10, dx, below)
        u, v = kg.image_position(a00, a01, a02, a10, a11, a12, dx, 3.0, -2.0, origin)
        assert idx == int(np.floor(v)) * w + int(np.floor(u))
        np.testing.assert_allclose((fu, fv), (u - np.floor(u), v - np.floor(v)), atol=1e-12)
        assert 0.0 <= fu < 1.0 and 0.0 <= fv < 1.0


def test_staged_rows_give_the_image_position(rot):
    rows = np.zeros((3, 6), np.float32)
    rot32 = rot.astype(np.float32)
    assert kg.stage_rows(rot32, 2, rows, 1) == kg.image_rows(rot32, 2)
    np.testing.assert_array_equal(rows[1], rot32[2, :2].ravel())
    x, y, z, c = np.float32(2.0), np.float32(-3.5), np.float32(1.0), np.float32(8.0)
    x0, y0, fx, fy = kg.staged_corner(rows, 1, x, y, z, c)
    u, v = kg.image_position(*kg.image_rows(rot32, 2), x, y, z, c)
    assert (x0, y0) == (np.floor(u), np.floor(v))
    assert (fx, fy) == (u - np.floor(u), v - np.floor(v))
    assert all(isinstance(f, np.float32) for f in (fx, fy))


def test_bilinear_weights_split_the_value(rng):
    for val, fx, fy in rng.uniform(0, 1, (20, 3)):
        w = kg.bilinear_weights(3.0 * val, fx, fy)
        assert sum(w) == pytest.approx(3.0 * val, rel=1e-14)
        gold = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
        np.testing.assert_allclose(w, 3.0 * val * np.array(gold), rtol=1e-13)
    assert kg.bilinear_weights(2.0, 0.0, 0.0) == (2.0, 0.0, 0.0, 0.0)
    assert kg.lerp(1.0, 3.0, 0.0) == 1.0 and kg.lerp(1.0, 3.0, 1.0) == 3.0 and kg.lerp(1.0, 3.0, 0.25) == 1.5


def test_trilinear_corner_and_weights(rng):
    for x, y, z in rng.uniform(-5, 5, (20, 3)):
        x0, y0, z0, fx, fy, fz = kg.trilinear_corner(x, y, z)
        assert (x0, y0, z0) == (np.floor(x), np.floor(y), np.floor(z))
        assert all(0.0 <= f < 1.0 for f in (fx, fy, fz))
        w = kg.trilinear_weights(2.0, fx, fy, fz, 1.0)
        assert sum(w) == pytest.approx(2.0, rel=1e-14)
        # the corner (z1, y1, x1) gets fx fy fz of the weight
        assert w[7] == pytest.approx(2.0 * fx * fy * fz, rel=1e-14)
    assert kg.trilinear_weights(1.0, 0.0, 0.0, 0.0, 1.0) == (1.0,) + (0.0,) * 7
    w32 = kg.trilinear_weights(np.float32(1.0), np.float32(0.5), np.float32(0.25), np.float32(0.75), np.float32(1.0))
    assert all(isinstance(v, np.float32) for v in w32) and sum(w32) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("n", [7, 8])
def test_signed_frequency_is_fftfreq(n):
    assert [kg.signed_frequency(i, n) for i in range(n)] == list(np.rint(np.fft.fftfreq(n) * n).astype(int))


def test_slice_frequency_is_a_transpose_k(rot):
    for b in range(len(rot)):
        q = kg.slice_frequency(*kg.image_rows(rot, b), 3, -2)
        np.testing.assert_allclose(q, rot[b].T @ np.array([3.0, -2.0, 0.0]), atol=1e-12)


@pytest.mark.parametrize("n,threads", [(7, 256), (12, 512), (17, 64)])
def test_bricks_cover_the_box_once_and_skip_only_empty_bricks(n, threads):
    r2_max = (n // 2 - 1) ** 2
    c, cf, depth, nbx, n_bricks, half_z = kg.brick_layout(n, threads)
    assert (c, cf, depth, half_z) == (n // 2, n // 2, threads // 64, 0.5 * (threads // 64 - 1))
    assert (nbx, n_bricks) == kg.brick_grid(n, depth) == (-(-n // kg.BRICK), nbx * nbx * -(-n // depth))
    seen = np.zeros((n, n, n), int)
    skipped = 0
    for brick in range(n_bricks):
        bx, by, bz, ccx, ccy, ccz = kg.brick_centre(brick, nbx, depth, c, half_z)
        outside = kg.brick_outside(ccx, ccy, ccz, half_z, r2_max)
        skipped += outside
        for tid in range(threads):
            j, i, k, rx, ry, rz, inside = kg.brick_voxel(bx, by, bz, depth, tid, n, c, r2_max)
            assert not (outside and inside), (brick, tid)
            if j < n and i < n and k < n:
                seen[k, i, j] += 1
                assert (rx, ry, rz) == (j - c, i - c, k - c)
                assert inside == ((j - c) ** 2 + (i - c) ** 2 + (k - c) ** 2 <= r2_max)
                # the centre is the mean of the brick's voxel offsets
                assert abs(rx - ccx) <= 3.5 and abs(ry - ccy) <= 3.5 and abs(rz - ccz) <= half_z
            else:
                assert not inside
    assert (seen == 1).all()
    assert skipped > 0 or n < 16


def test_periodic_cell():
    assert kg.periodic_cell(-1, 3, 7, 8) == (7, 3, 7, 0, 4, 0)
    assert kg.periodic_cell(-9, 0, 15, 8) == (7, 0, 7, 0, 1, 0)


def test_clipped_span():
    assert kg.clipped_span(5.3, 1.6, 0, 9) == (4, 6)
    assert kg.clipped_span(0.2, 2.0, 0, 9) == (0, 2)
    assert kg.clipped_span(8.5, 2.0, 0, 9) == (7, 9)
    assert kg.clipped_span(-1.5, 1.6, -3, 3) == (-3, 0)
    lo, hi = kg.clipped_span(20.0, 1.0, 0, 9)
    assert lo > hi


@pytest.mark.skipif(not SIMULATOR, reason="about the simulator, where kernels call the Python functions")
def test_the_simulator_calls_the_helpers_as_python_functions():
    helpers = (kg.lerp, kg.image_rows)
    assert inline_device_functions(*helpers) == helpers


# --- the same numbers compiled ---------------------------------------------------------------


def _geometry_py(rot, r, rows, out):
    """A few helpers chained as a kernel chains them (one voxel, one image)."""
    a00, a01, a02, a10, a11, a12 = kg.stage_rows(rot, 0, rows, 0)
    u, v = kg.image_position(a00, a01, a02, a10, a11, a12, r[0], r[1], r[2], r[3])
    x0, y0, fx, fy = kg.staged_corner(rows, 0, r[0], r[1], r[2], r[3])
    w00, w01, w10, w11 = kg.bilinear_weights(r[4], fx, fy)
    qx, qy, qz = kg.slice_frequency(a00, a01, a02, a10, a11, a12, r[0], r[1])
    i0, i1, i2, tx, ty, tz = kg.trilinear_corner(qx, qy, qz)
    t000, t001, t010, t011, t100, t101, t110, t111 = kg.trilinear_weights(r[4], tx, ty, tz, r[5])
    out[0], out[1], out[2], out[3], out[4], out[5] = u, v, x0, y0, fx, fy
    out[6], out[7], out[8], out[9], out[10] = w00, w01, w10, w11, kg.lerp(w00, w11, fx)
    out[11], out[12], out[13], out[14], out[15], out[16] = qx, qy, qz, i0, i1, i2
    out[17], out[18], out[19], out[20], out[21], out[22] = tx, ty, tz, t000, t011, t111


_N_OUT = 23


def _inputs(rng, dtype):
    rot = random_rotations(1, rng).astype(dtype)
    r = np.array([2.0, -3.0, 1.5, 8.0, 0.7, 1.0], dtype)
    return rot, r


def test_njit_calls_give_the_python_numbers(rng):
    # float64, as the CPU kernels that interpolate trilinearly run (on the CPU, math.floor of a
    # float is an integer, so float32 fractions would be promoted where Python keeps float32)
    rot, r = _inputs(rng, np.float64)
    expected = np.zeros(_N_OUT)
    _geometry_py(rot, r, np.zeros((1, 6)), expected)
    got = np.zeros(_N_OUT)
    numba.njit(_geometry_py)(rot, r, np.zeros((1, 6)), got)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(not is_available(), reason="needs the CUDA simulator or a GPU")
def test_a_cuda_kernel_gives_the_python_numbers(rng):
    # the kernel calls the helpers as the CUDA twins do
    (stage, position, corner, weights, frequency, tri_corner, tri_weights, lerp) = inline_device_functions(
        kg.stage_rows, kg.image_position, kg.staged_corner, kg.bilinear_weights, kg.slice_frequency,
        kg.trilinear_corner, kg.trilinear_weights, kg.lerp)

    @cuda.jit
    def kernel(rot, r, out):
        rows = cuda.shared.array((1, 6), np.float32)
        if cuda.grid(1) == 0:
            a00, a01, a02, a10, a11, a12 = stage(rot, 0, rows, 0)
            u, v = position(a00, a01, a02, a10, a11, a12, r[0], r[1], r[2], r[3])
            x0, y0, fx, fy = corner(rows, 0, r[0], r[1], r[2], r[3])
            w00, w01, w10, w11 = weights(r[4], fx, fy)
            qx, qy, qz = frequency(a00, a01, a02, a10, a11, a12, r[0], r[1])
            i0, i1, i2, tx, ty, tz = tri_corner(qx, qy, qz)
            t000, t001, t010, t011, t100, t101, t110, t111 = tri_weights(r[4], tx, ty, tz, r[5])
            out[0], out[1], out[2], out[3], out[4], out[5] = u, v, x0, y0, fx, fy
            out[6], out[7], out[8], out[9], out[10] = w00, w01, w10, w11, lerp(w00, w11, fx)
            out[11], out[12], out[13], out[14], out[15], out[16] = qx, qy, qz, i0, i1, i2
            out[17], out[18], out[19], out[20], out[21], out[22] = tx, ty, tz, t000, t011, t111

    rot, r = _inputs(rng, np.float32)
    expected = np.zeros(_N_OUT, np.float32)
    _geometry_py(rot, r, np.zeros((1, 6), np.float32), expected)
    out = cuda.to_device(np.zeros(_N_OUT, np.float32))
    kernel[1, 1](cuda.to_device(rot), cuda.to_device(r), out)
    got = out.copy_to_host()
    if SIMULATOR:
        np.testing.assert_array_equal(got, expected)
    else:  # a GPU contracts a * b + c into one rounding
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
