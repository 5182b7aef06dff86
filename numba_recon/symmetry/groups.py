"""Point-group symmetry: RELION's operators and volume symmetrisation.

The groups are built from RELION's generators (``src/symmetries.cpp``, ``fill_symmetry_class``)
and closed numerically, so the operator sets are exactly RELION's:

========  ==============================================================================  =====
group     generators (rotation axis ``x y z``)                                              order
========  ==============================================================================  =====
``Cn``    n-fold about Z                                                                    n
``Dn``    n-fold about Z, 2-fold about X                                                    2n
``T``     3-fold about Z, 2-fold about ``(0, 0.816496, 0.577350)``                          12
``O``     3-fold about ``(1, 1, 1)/sqrt(3)``, 4-fold about Z                                24
``I2``    2-fold about Z, 5-fold ``(0.525731, 0, 0.850651)``, 3-fold ``(0, 0.356822, 0.934172)``  60
``I1``    2-fold about X, 5-fold ``(0.850651, 0, -0.525731)``, 3-fold ``(0.934172, 0.356822, 0)``  60
``I3``    5-fold about Z, 2-fold ``(-0.525731, 0, 0.850651)``                               60
``I4``    2-fold ``(0.525731, 0, 0.850651)``, 5-fold ``(0.894427, 0, 0.447214)``             60
========  ==============================================================================  =====

``I`` is ``I2``. The axes are written below in closed form (golden ratio); they equal RELION's
six-digit values to 1e-6. A group is a set of rotations, so the sense of each generator does not
matter. A map ``x`` has the symmetry when ``x(R_g r) = x(r)`` for every operator ``R_g``, with
``r = (x, y, z)`` the voxel offset from the box centre ``N // 2``.

Two ways to impose a group on a voxel map exist (``docs/symmetry.md`` explains the choice):

- :func:`symmetrize_volume` (here), the group average with trilinear interpolation. Cheap (one
  pass), used on every optimiser step, but not a projection: applying it twice blurs a little more.
- :class:`~numba_recon.symmetry.subspace.SymmetricSubspace`, the exact orthogonal projection onto
  the maps that are grid samples of an exactly invariant function (a sum of radial kernels placed
  on whole orbits). It is idempotent to the tolerance of its solver and is applied to the final maps.
"""

from __future__ import annotations

import logging

import numba
import numpy as np

from numba_recon import kernel_geometry as kg
from numba_recon.symmetry.names import parse_symmetry_name


log = logging.getLogger(__name__)

_PHI = (1.0 + np.sqrt(5.0)) / 2.0
_TOL = 1e-6
_MAX_ORDER = 10_000


def axis_angle_matrix(axis, angle_rad: float) -> np.ndarray:
    """Right-handed rotation by ``angle_rad`` about ``axis`` (Rodrigues' formula), ``(3, 3)`` float64."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k)


def _fold(axis, n: int) -> np.ndarray:
    return axis_angle_matrix(axis, 2.0 * np.pi / n)


def _icosahedral_generators(name: str) -> list[tuple[tuple[float, float, float], int]]:
    # unit vectors along the 5-fold (1, 0, phi), 3-fold (0, 1/phi, phi)/sqrt(3) and (2, 0, 1)/sqrt(5) directions
    s5 = 1.0 / np.sqrt(1.0 + _PHI**2)  # 0.525731
    c5 = _PHI * s5  # 0.850651
    t_small = 1.0 / (_PHI * np.sqrt(3.0))  # 0.356822
    t_big = _PHI / np.sqrt(3.0)  # 0.934172
    if name == "I2":
        return [((0, 0, 1), 2), ((s5, 0, c5), 5), ((0, t_small, t_big), 3)]
    if name == "I1":
        return [((1, 0, 0), 2), ((c5, 0, -s5), 5), ((t_big, t_small, 0), 3)]
    if name == "I3":
        return [((0, 0, 1), 5), ((-s5, 0, c5), 2)]
    # I4
    return [((s5, 0, c5), 2), ((2.0 / np.sqrt(5.0), 0, 1.0 / np.sqrt(5.0)), 5)]


def symmetry_generators(name: str) -> list[tuple[np.ndarray, int]]:
    """RELION's generators of a point group: a list of ``(unit axis (3,), fold n)``.

    Raises :class:`~numba_recon.errors.InputError` for an unknown name.
    """
    key = parse_symmetry_name(name)
    z, x = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)
    if key[0] == "C":
        gens = [(z, int(key[1:]))]
    elif key[0] == "D":
        gens = [(z, int(key[1:])), (x, 2)]
    elif key == "T":
        gens = [(z, 3), ((0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)), 2)]
    elif key == "O":
        gens = [((1.0, 1.0, 1.0), 3), (z, 4)]
    else:
        gens = _icosahedral_generators(key)
    out = []
    for axis, n in gens:
        a = np.asarray(axis, dtype=np.float64)
        out.append((a / np.linalg.norm(a), n))
    return out


def _close_group(generators: list[np.ndarray]) -> np.ndarray:
    """All products of the generators, deduplicated to ``_TOL``; identity first, then in discovery order."""
    elements = [np.eye(3)]
    flat = np.eye(3).reshape(1, 9)
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if np.abs(flat - p.reshape(1, 9)).max(axis=1).min() > _TOL:
                    elements.append(p)
                    flat = np.vstack([flat, p.reshape(1, 9)])
                    new.append(p)
                    if len(elements) > _MAX_ORDER:
                        raise RuntimeError("symmetry generators do not close into a finite group")
        frontier = new
    return np.stack(elements)


def symmetry_operators(name: str) -> np.ndarray:
    """The rotation operators of a point group, RELION's convention.

    Parameters
    ----------
    name
        ``C1``, ``Cn``, ``Dn`` (``n >= 1``), ``T``, ``O``, ``I`` (= ``I2``), ``I1``, ``I2``, ``I3``
        or ``I4``; case-insensitive.

    Returns
    -------
    numpy.ndarray
        ``(G, 3, 3)`` float64 proper rotations, identity first; ``G`` is ``n`` for ``Cn``, ``2n``
        for ``Dn``, 12 for ``T``, 24 for ``O`` and 60 for the icosahedral groups.

    Raises
    ------
    InputError
        Unknown name; the message lists the valid ones.
    """
    gens = [_fold(axis, n) for axis, n in symmetry_generators(name)]
    return _close_group(gens)


def symmetry_order(name: str) -> int:
    """Number of operators of a point group (see :func:`symmetry_operators`)."""
    return int(symmetry_operators(name).shape[0])


@numba.njit(parallel=True, cache=True)
def _symmetrize_kernel(volume, operators, out):  # pragma: no cover - compiled
    n = volume.shape[0]
    c = n // 2
    g_count = operators.shape[0]
    inv_g = 1.0 / g_count
    for k in numba.prange(n):
        z = k - c
        for i in range(n):
            y = i - c
            for j in range(n):
                x = j - c
                acc = 0.0
                for g in range(g_count):
                    # sample the map at R_g r (offsets from the centre, then back to indices)
                    sx = operators[g, 0, 0] * x + operators[g, 0, 1] * y + operators[g, 0, 2] * z + c
                    sy = operators[g, 1, 0] * x + operators[g, 1, 1] * y + operators[g, 1, 2] * z + c
                    sz = operators[g, 2, 0] * x + operators[g, 2, 1] * y + operators[g, 2, 2] * z + c
                    x0, y0, z0, fx, fy, fz = kg.trilinear_corner(sx, sy, sz)
                    for dz in range(2):
                        zz = z0 + dz
                        if zz < 0 or zz >= n:
                            continue
                        wz = fz if dz == 1 else 1.0 - fz
                        for dy in range(2):
                            yy = y0 + dy
                            if yy < 0 or yy >= n:
                                continue
                            wzy = wz * (fy if dy == 1 else 1.0 - fy)
                            for dx in range(2):
                                xx = x0 + dx
                                if xx < 0 or xx >= n:
                                    continue
                                acc += wzy * (fx if dx == 1 else 1.0 - fx) * volume[zz, yy, xx]
                out[k, i, j] = acc * inv_g


def symmetrize_volume(volume: np.ndarray, operators: np.ndarray) -> np.ndarray:
    """Average a map over a point group: ``out(r) = mean_g x(R_g r)``.

    Samples are taken with trilinear interpolation about the box centre ``N // 2``; samples that
    fall outside the box count as zero, so keep the density inside the inscribed sphere.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map indexed ``[z, y, x]``.
    operators
        ``(G, 3, 3)`` rotations, e.g. from :func:`symmetry_operators`.

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)``, float32 (float64 if ``volume`` is float64).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"symmetrize_volume needs a cubic (N, N, N) volume, got shape {vol.shape}")
    ops = np.ascontiguousarray(operators, dtype=np.float64).reshape(-1, 3, 3)
    if ops.shape[0] == 1 and np.allclose(ops[0], np.eye(3), atol=_TOL):
        return vol.astype(np.float64 if vol.dtype == np.float64 else np.float32, copy=True)
    src = np.ascontiguousarray(vol, dtype=np.float64)
    out = np.empty_like(src)
    _symmetrize_kernel(src, ops, out)
    return out if vol.dtype == np.float64 else out.astype(np.float32)


def interpolation_invariance_errors(volume: np.ndarray, operators: np.ndarray) -> np.ndarray:
    """Relative change of a map under each operator, measured with trilinear interpolation.

    ``||x(R_g r) - x(r)|| / ||x||`` per operator, the resampling done by :func:`symmetrize_volume`
    with one operator. Even an exactly symmetric object sampled on the grid scores above zero here:
    the figure includes trilinear interpolation's own error (``docs/symmetry.md``).

    Returns
    -------
    numpy.ndarray
        ``(G,)`` float64 (0 for the identity).
    """
    vol = np.asarray(volume, dtype=np.float64)
    norm = float(np.linalg.norm(vol))
    ops = np.asarray(operators, dtype=np.float64).reshape(-1, 3, 3)
    if norm == 0.0:
        return np.zeros(len(ops))
    return np.array([float(np.linalg.norm(symmetrize_volume(vol, g[None]) - vol)) / norm for g in ops])
