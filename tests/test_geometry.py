"""The RELION / THUNDER geometry conventions, asserted with the published test vectors."""

import numpy as np
import pytest

from numba_recon.geometry import (
    box_center,
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
    quaternion_to_rotation,
    random_rotations,
)


def Rz(t):
    c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def Ry(t):
    c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def test_relion_matrix_vectors():
    np.testing.assert_allclose(euler_to_matrix(30, 60, 90), [[-0.5, 0.8660254, 0.0],
                                                             [-0.4330127, -0.25, 0.8660254],
                                                             [0.75, 0.4330127, 0.5]], atol=1e-6)
    np.testing.assert_allclose(euler_to_matrix(10, 20, 30), [[0.71461, 0.633718, -0.296198],
                                                             [-0.613092, 0.771281, 0.17101],
                                                             [0.336824, 0.059391, 0.939693]], atol=1e-6)


def test_closed_form_and_viewing_direction(rng):
    for rot, tilt, psi in rng.uniform(-180, 180, (100, 3)):
        A = euler_to_matrix(rot, tilt, psi)
        np.testing.assert_allclose(A, (Rz(rot) @ Ry(tilt) @ Rz(psi)).T, atol=1e-12)
        r, t = np.deg2rad(rot), np.deg2rad(tilt)
        np.testing.assert_allclose(A[2], [np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], atol=1e-12)


@pytest.mark.parametrize("angles,voxel,image,depth", [
    ((90, 0, 0), (5, 0, 0), (0, -5), 0),
    ((0, 90, 0), (0, 0, 5), (-5, 0), 0),
    ((0, 90, 0), (0, 5, 0), (0, 5), 0),
    ((0, 0, 90), (5, 0, 0), (0, -5), 0),
    ((30, 60, 90), (1, 2, 3), (1.232051, 1.665064), 3.116025),
])
def test_splat_table(angles, voxel, image, depth):
    p = euler_to_matrix(*angles) @ np.array(voxel, float)
    np.testing.assert_allclose(p[:2], image, atol=1e-6)
    np.testing.assert_allclose(p[2], depth, atol=1e-6)


def test_vectorised_and_round_trip(rng):
    angles = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(1, 179, 50), rng.uniform(-180, 180, 50)])
    A = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    assert A.shape == (50, 3, 3)
    back = matrix_to_euler(A)
    np.testing.assert_allclose(euler_to_matrix(back[:, 0], back[:, 1], back[:, 2]), A, atol=1e-10)
    # degenerate tilt 0 and 180
    for tilt in (0.0, 180.0):
        A0 = euler_to_matrix(20, tilt, 40)
        e = matrix_to_euler(A0)
        np.testing.assert_allclose(euler_to_matrix(*e), A0, atol=1e-10)


@pytest.mark.parametrize("angles,q", [
    ((30, 60, 90), (0.433013, 0.25, 0.433013, 0.75)),
    ((10, 20, 30), (0.925417, 0.030154, 0.17101, 0.336824)),
    ((-100, 135, -45), (0.115075, 0.4266, 0.819491, -0.364972)),
])
def test_thunder_quaternions(angles, q):
    A = euler_to_matrix(*angles)
    got = matrix_to_quaternion(A)
    sign = np.sign(got @ np.array(q))
    np.testing.assert_allclose(sign * got, q, atol=1e-6)
    np.testing.assert_allclose(quaternion_to_rotation(np.array(q)).T, A, atol=1e-5)
    np.testing.assert_allclose(quaternion_to_matrix(np.array(q)), A, atol=1e-5)


def test_aspire_and_cryodrgn_interop(rng):
    from scipy.spatial.transform import Rotation

    for rot, tilt, psi in rng.uniform(-180, 180, (20, 3)):
        A = euler_to_matrix(rot, tilt, psi)
        np.testing.assert_allclose(Rotation.from_euler("ZYZ", np.deg2rad([rot, tilt, psi])).as_matrix(), A.T,
                                   atol=1e-12)
        # cryoDRGN's R_from_relion_scipy: from_euler("zxz", [rot+90, tilt, psi-90]) with a sign mask
        r = Rotation.from_euler("zxz", [rot + 90, tilt, psi - 90], degrees=True).as_matrix()
        mask = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]])
        np.testing.assert_allclose(r * mask, A, atol=1e-12)


def test_centre_index():
    assert box_center(64) == 32 and box_center(65) == 32 and box_center(1) == 0


def test_random_rotations_are_uniform(rng):
    R = random_rotations(20000, rng)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # viewing directions (third row of A = R^T) are uniform on the sphere: <z> = 0, <z^2> = 1/3
    z = R[:, 2, 2]
    assert abs(z.mean()) < 0.02 and abs((z**2).mean() - 1 / 3) < 0.01
