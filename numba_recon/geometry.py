"""Geometry conventions: RELION Euler angles, THUNDER quaternions, the box centre, shift signs.

Conventions (stated once in ``docs/conventions.md``):

- Arrays are indexed ``[z, y, x]`` (volumes) and ``[n, y, x]`` (images); x is the column.
- The centre of a box of size ``N`` is index ``N // 2`` for odd and even ``N``.
- ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's matrix (``Euler_angles2matrix``). It maps a
  map coordinate ``r = (x, y, z)`` (offset from the centre) to the image frame: the voxel lands at
  image position ``((A r)_x, (A r)_y)`` and ``(A r)_z`` is the depth along the beam.
  ``A = (Rz(rot) Ry(tilt) Rz(psi))^T``.
- THUNDER stores a unit quaternion ``q = (w, x, y, z)`` whose active rotation matrix is
  ``R(q) = A^T``.
- RELION's origin is the shift to *apply* to the image to centre the particle: ``T^{-1} b`` moves
  the image content by ``+origin``.
"""

from __future__ import annotations

import numpy as np

_EPS = float(np.finfo(np.float32).eps)


def box_center(n: int) -> int:
    """Index of the box centre for size ``n``: ``n // 2`` for odd and even ``n``."""
    return int(n) // 2


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION Euler angles (degrees) to rotation matrices ``A``.

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg
        Scalars or arrays of shape ``(n,)``.

    Returns
    -------
    numpy.ndarray
        ``(3, 3)`` for scalar input, else ``(n, 3, 3)``, float64. ``A`` maps map coordinates to the
        image frame (RELION ``Euler_angles2matrix``).
    """
    scalar = np.ndim(rot_deg) == 0 and np.ndim(tilt_deg) == 0 and np.ndim(psi_deg) == 0
    a, b, g = (np.deg2rad(np.atleast_1d(np.asarray(v, dtype=np.float64))) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3), dtype=np.float64)
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m[0] if scalar else m


def _sgn(v: float) -> float:
    return 1.0 if v >= 0 else -1.0


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices ``A`` to RELION Euler angles (RELION ``Euler_matrix2angles``).

    Parameters
    ----------
    matrices
        ``(3, 3)`` or ``(n, 3, 3)``.

    Returns
    -------
    numpy.ndarray
        ``(3,)`` or ``(n, 3)``: rot, tilt, psi in degrees.
    """
    m = np.asarray(matrices, dtype=np.float64)
    single = m.ndim == 2
    m = m.reshape(-1, 3, 3)
    out = np.empty((m.shape[0], 3), dtype=np.float64)
    for i, A in enumerate(m):
        abs_sb = np.hypot(A[0, 2], A[1, 2])
        if abs_sb > 16 * _EPS:
            gamma = np.arctan2(A[1, 2], -A[0, 2])
            alpha = np.arctan2(A[2, 1], A[2, 0])
            if abs(np.sin(gamma)) < _EPS:
                sign_sb = _sgn(-A[0, 2] / np.cos(gamma))
            else:
                sign_sb = _sgn(A[1, 2]) if np.sin(gamma) > 0 else -_sgn(A[1, 2])
            beta = np.arctan2(sign_sb * abs_sb, A[2, 2])
        elif A[2, 2] >= 0:
            alpha, beta, gamma = 0.0, 0.0, np.arctan2(-A[1, 0], A[0, 0])
        else:
            alpha, beta, gamma = 0.0, np.pi, np.arctan2(A[1, 0], -A[0, 0])
        out[i] = np.rad2deg([alpha, beta, gamma])
    return out[0] if single else out


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Active rotation matrix ``R(q) = I + 2w[v]x + 2[v]x^2`` of unit quaternions ``(w, x, y, z)``.

    ``q``: ``(4,)`` or ``(n, 4)``; normalised here. Returns ``(3, 3)`` or ``(n, 3, 3)``.
    For THUNDER, ``R(q) = A^T`` (see :func:`quaternion_to_matrix`).
    """
    q = np.asarray(q, dtype=np.float64)
    single = q.ndim == 1
    q = q.reshape(-1, 4)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    w, x, y, z = (q / norm).T
    r = np.empty((q.shape[0], 3, 3))
    r[:, 0, 0] = 1 - 2 * (y * y + z * z)
    r[:, 0, 1] = 2 * (x * y - w * z)
    r[:, 0, 2] = 2 * (x * z + w * y)
    r[:, 1, 0] = 2 * (x * y + w * z)
    r[:, 1, 1] = 1 - 2 * (x * x + z * z)
    r[:, 1, 2] = 2 * (y * z - w * x)
    r[:, 2, 0] = 2 * (x * z - w * y)
    r[:, 2, 1] = 2 * (y * z + w * x)
    r[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return r[0] if single else r


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """THUNDER quaternion(s) ``(w, x, y, z)`` to RELION matrices ``A = R(q)^T``."""
    r = quaternion_to_rotation(q)
    return np.swapaxes(r, -1, -2)


def rotation_to_quaternion(r: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(n, 3, 3)`` or ``(3, 3)`` to unit quaternions ``(w, x, y, z)`` with ``w >= 0``."""
    r = np.asarray(r, dtype=np.float64)
    single = r.ndim == 2
    r = r.reshape(-1, 3, 3)
    q = np.empty((r.shape[0], 4))
    for i, m in enumerate(r):
        t = np.trace(m)
        if t > 0:
            s = np.sqrt(t + 1.0) * 2
            q[i] = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
        elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
            s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
            q[i] = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
        elif m[1, 1] > m[2, 2]:
            s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
            q[i] = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
        else:
            s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
            q[i] = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
        if q[i, 0] < 0:
            q[i] = -q[i]
        q[i] /= np.linalg.norm(q[i])
    return q[0] if single else q


def matrix_to_quaternion(matrices: np.ndarray) -> np.ndarray:
    """RELION matrices ``A`` to THUNDER quaternions: ``quat(A^T)``."""
    return rotation_to_quaternion(np.swapaxes(np.asarray(matrices, dtype=np.float64), -1, -2))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly from SO(3) (normalised Gaussian quaternions).

    Returns ``(n, 3, 3)`` float64.
    """
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return quaternion_to_rotation(q)


def default_radius_px(box_size: int) -> float:
    """Default support radius of a box of ``box_size`` pixels: ``box_size // 2 - 1``.

    The largest sphere around the centre ``N // 2`` whose bilinear footprint stays inside the
    image for every orientation, for odd and even ``N``.
    """
    n = int(box_size)
    if n < 2:
        raise ValueError(f"box_size must be >= 2, got {box_size!r}")
    return float(n // 2 - 1)
