"""The exact orthogonal projection onto maps with a point group's symmetry.

:class:`SymmetricSubspace` spans the maps that are grid samples of an exactly invariant function
(a sum of radial kernels placed on whole orbits of the group). The projection is idempotent to the
tolerance of its solver; the engine applies it to the final maps and, with ``adam``, to each half
map after the step (``docs/symmetry.md``). The cheap group average lives in :mod:`.groups`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numba
import numpy as np

from numba_recon import kernel_geometry as kg
from numba_recon.geometry import default_radius_px
from numba_recon.symmetry.groups import symmetry_operators, symmetry_order
from numba_recon.symmetry.names import parse_symmetry_name

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Exact projection onto symmetric maps
# ------------------------------------------------------------------------------------------------

#: Radius (voxels) of the kernel ``K(d) = (1 - d^2 / rho^2)^3`` placed on every orbit point (zero
#: beyond it, twice continuously differentiable). Wider kernels fit maps better but condition the
#: least-squares problem worse; 1.6 fits a symmetric test object about as well as trilinear averaging.
KERNEL_RADIUS_PX = 1.6
#: Distinct orbit points are kept at least this far apart (voxels), which bounds the condition number.
MIN_SEPARATION_PX = 0.8
# a generic direction (on no symmetry element of any group here) that picks the asymmetric unit
_REFERENCE_DIRECTION = np.array([0.31, 0.17, 0.93]) / np.linalg.norm([0.31, 0.17, 0.93])


@numba.njit(cache=True)
def _select_orbits(cand, ops, n, min_sep):  # pragma: no cover - compiled
    """Greedily accept candidate points whose whole orbit keeps ``min_sep`` from every point accepted
    so far (and whose own distinct orbit points are that far apart). Returns the accepted candidate
    indices, the start of each orbit in ``points`` and the distinct orbit points."""
    m = cand.shape[0]
    g_count = ops.shape[0]
    c = n // 2
    grid = n + 3
    head = np.full(grid * grid * grid, -1, np.int64)
    cap = m + m // 2 + g_count  # about one orbit point per voxel; grown below if needed
    nxt = np.empty(cap, np.int64)
    points = np.empty((cap, 3))
    accepted = np.empty(m, np.int64)
    start = np.empty(m + 1, np.int64)
    start[0] = 0
    orbit = np.empty((g_count, 3))
    keep = np.empty(g_count, np.bool_)
    cells = np.empty(g_count, np.int64)
    n_points = 0
    n_acc = 0
    sep2 = min_sep * min_sep
    for i in range(m):
        px = cand[i, 0]
        py = cand[i, 1]
        pz = cand[i, 2]
        n_stab = 0
        ok = True
        for g in range(g_count):
            for a in range(3):
                orbit[g, a] = ops[g, a, 0] * px + ops[g, a, 1] * py + ops[g, a, 2] * pz
            d2 = (orbit[g, 0] - px) ** 2 + (orbit[g, 1] - py) ** 2 + (orbit[g, 2] - pz) ** 2
            if d2 < 1e-12:
                n_stab += 1
            elif d2 < sep2:  # near (not on) a symmetry axis: its own images crowd together
                ok = False
                break
        if not ok:
            continue
        for g in range(g_count):
            keep[g] = True
        if n_stab > 1:  # on a symmetry axis: the orbit repeats each point n_stab times
            for g in range(g_count):
                for h in range(g):
                    if keep[h] and ((orbit[g, 0] - orbit[h, 0]) ** 2 + (orbit[g, 1] - orbit[h, 1]) ** 2
                                    + (orbit[g, 2] - orbit[h, 2]) ** 2) < 1e-12:
                        keep[g] = False
                        break
        for g in range(g_count):
            if not keep[g]:
                continue
            ix = int(np.floor(orbit[g, 0] + 0.5)) + c + 1
            iy = int(np.floor(orbit[g, 1] + 0.5)) + c + 1
            iz = int(np.floor(orbit[g, 2] + 0.5)) + c + 1
            cells[g] = (iz * grid + iy) * grid + ix
            for dz in range(-1, 2):
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        j = head[((iz + dz) * grid + iy + dy) * grid + ix + dx]
                        while j >= 0:
                            d2 = ((points[j, 0] - orbit[g, 0]) ** 2 + (points[j, 1] - orbit[g, 1]) ** 2
                                  + (points[j, 2] - orbit[g, 2]) ** 2)
                            if d2 < sep2:
                                ok = False
                                break
                            j = nxt[j]
                        if not ok:
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if not ok:
                break
        if not ok:
            continue
        if n_points + g_count > cap:
            cap = 2 * cap
            grown = np.empty((cap, 3))
            grown[:n_points] = points[:n_points]
            points = grown
            grown_next = np.empty(cap, np.int64)
            grown_next[:n_points] = nxt[:n_points]
            nxt = grown_next
        for g in range(g_count):
            if keep[g]:
                points[n_points, 0] = orbit[g, 0]
                points[n_points, 1] = orbit[g, 1]
                points[n_points, 2] = orbit[g, 2]
                nxt[n_points] = head[cells[g]]
                head[cells[g]] = n_points
                n_points += 1
        accepted[n_acc] = i
        n_acc += 1
        start[n_acc] = n_points
    return accepted[:n_acc].copy(), start[:n_acc + 1].copy(), points[:n_points].copy()


@numba.njit(inline="always")
def _kernel(d2, inv_r2):  # pragma: no cover - compiled
    t = 1.0 - d2 * inv_r2
    return t * t * t


@numba.njit(inline="always")
def _visit_point(grid, px, py, pz, rho, r2, inv, scatter, a, acc):  # pragma: no cover - compiled
    """The kernel placed at ``p`` (offset from the centre ``N // 2``) against the grid voxels within
    ``rho`` of it, visited in z, y, x order: with ``scatter``, ``grid += a K(|r - p|)``; without,
    returns ``acc`` plus ``<K(|r - p|), grid>``. ``scatter`` is a constant at each call site, so the
    branch folds away."""
    n = grid.shape[0]
    c = n // 2
    # offsets whose voxel lies in the box
    z0, z1 = kg.clipped_span(pz, rho, -c, n - 1 - c)
    y0, y1 = kg.clipped_span(py, rho, -c, n - 1 - c)
    x0, x1 = kg.clipped_span(px, rho, -c, n - 1 - c)
    for z in range(z0, z1 + 1):
        dz2 = (z - pz) ** 2
        for y in range(y0, y1 + 1):
            dzy2 = dz2 + (y - py) ** 2
            for x in range(x0, x1 + 1):
                d2 = dzy2 + (x - px) ** 2
                if d2 < r2:
                    if scatter:
                        grid[z + c, y + c, x + c] += a * _kernel(d2, inv)
                    else:
                        acc += _kernel(d2, inv) * grid[z + c, y + c, x + c]
    return acc


@numba.njit(parallel=True, cache=True)
def _analyse(volume, points, start, rho, out):  # pragma: no cover - compiled
    """``out[q] = <phi_q, volume>`` (the adjoint of :func:`_synthesize`)."""
    r2 = rho * rho
    inv = 1.0 / r2
    for q in numba.prange(start.size - 1):
        acc = 0.0
        for j in range(start[q], start[q + 1]):
            acc = _visit_point(volume, points[j, 0], points[j, 1], points[j, 2], rho, r2, inv, False, 0.0, acc)
        out[q] = acc


@numba.njit(parallel=True, cache=True)
def _synthesize(coeffs, points_z, owner_z, slab_start, rho, out):  # pragma: no cover - compiled
    """``out += sum_q coeffs[q] phi_q`` on the grid.

    The points are sorted by z into slabs thicker than the kernel's diameter; even slabs, then odd
    slabs, are scattered in parallel, so no two threads ever write the same voxel.
    """
    r2 = rho * rho
    inv = 1.0 / r2
    n_slabs = slab_start.size - 1
    for parity in range(2):
        for h in numba.prange((n_slabs - parity + 1) // 2):
            s = 2 * h + parity
            for j in range(slab_start[s], slab_start[s + 1]):
                a = coeffs[owner_z[j]]
                if a != 0.0:
                    _visit_point(out, points_z[j, 0], points_z[j, 1], points_z[j, 2], rho, r2, inv, True, a, 0.0)


@numba.njit(parallel=True, cache=True)
def _evaluate(coeffs, points, owner, cell_start, n, queries, rho, out):  # pragma: no cover - compiled
    """The symmetric function ``sum_q coeffs[q] phi_q`` at arbitrary points (offsets from the centre)."""
    c = n // 2
    grid = n + 3
    r2 = rho * rho
    inv = 1.0 / r2
    reach = int(np.floor(rho + 1.0))  # |round(p) - round(q)| <= |p - q| + 1
    for i in numba.prange(queries.shape[0]):
        qx = queries[i, 0]
        qy = queries[i, 1]
        qz = queries[i, 2]
        ix = int(np.floor(qx + 0.5)) + c + 1
        iy = int(np.floor(qy + 0.5)) + c + 1
        iz = int(np.floor(qz + 0.5)) + c + 1
        acc = 0.0
        for z in range(max(iz - reach, 0), min(iz + reach, grid - 1) + 1):
            for y in range(max(iy - reach, 0), min(iy + reach, grid - 1) + 1):
                for x in range(max(ix - reach, 0), min(ix + reach, grid - 1) + 1):
                    cell = (z * grid + y) * grid + x
                    for j in range(cell_start[cell], cell_start[cell + 1]):
                        d2 = (points[j, 0] - qx) ** 2 + (points[j, 1] - qy) ** 2 + (points[j, 2] - qz) ** 2
                        if d2 < r2:
                            acc += coeffs[owner[j]] * _kernel(d2, inv)
        out[i] = acc


@dataclass(frozen=True)
class ProjectionInfo:
    """How the last :meth:`SymmetricSubspace.project` solve went."""

    iterations: int
    relative_residual: float


class SymmetricSubspace:
    """The maps that are grid samples of an exactly symmetric function, and the orthogonal
    projection onto them.

    Every basis function is ``phi_q(r) = sum_{p in orbit(q)} K(|r - p|)``: a radial kernel ``K``
    (``(1 - d^2 / rho^2)^3``, ``rho`` = :data:`KERNEL_RADIUS_PX`, zero beyond) placed on
    every distinct point of the orbit ``{R_g q}`` of a representative ``q``. Because ``K`` is
    radial and the orbit is a set closed under the group, ``phi_q(R_g r) = phi_q(r)`` exactly for
    every point ``r`` of space, not only on the grid. The representatives are voxel centres inside
    the support ball, taken from the asymmetric unit first and then wherever a whole orbit still
    fits, so that all orbit points stay :data:`MIN_SEPARATION_PX` apart (about one basis function
    per ``G`` voxels, a well-conditioned basis).

    :meth:`project` solves the least-squares problem ``min_a ||Phi a - x||`` by preconditioned
    conjugate gradients (float64) and returns ``Phi a``: the closest such map to ``x``. It is an
    orthogonal projection, so projecting twice changes nothing (up to the solver tolerance).

    Parameters
    ----------
    box_size
        ``N`` of the ``(N, N, N)`` maps.
    operators
        ``(G, 3, 3)`` rotations of a point group (:func:`symmetry_operators`).
    radius_px
        Radius (voxels) of the ball that holds the representatives; maps are taken to vanish
        beyond it plus the kernel radius. Default ``N // 2 - 1``, the reconstruction's support.
    """

    def __init__(self, box_size: int, operators: np.ndarray, radius_px: float | None = None) -> None:
        n = int(box_size)
        if n < 4:
            raise ValueError(f"box size {n} is too small for a symmetric subspace")
        ops = np.ascontiguousarray(operators, dtype=np.float64).reshape(-1, 3, 3)
        largest = default_radius_px(n)
        radius = largest if radius_px is None else float(radius_px)
        if not 0 < radius <= largest + 1e-9:
            raise ValueError(f"radius {radius} must lie in (0, {largest:g}] for box {n}")
        self.box_size = n
        self.operators = ops
        self.radius_px = radius
        self.kernel_radius_px = KERNEL_RADIUS_PX
        c = n // 2
        z, y, x = np.mgrid[:n, :n, :n] - c
        inside = (x**2 + y**2 + z**2) <= radius**2 + 1e-9
        cand = np.stack([x[inside], y[inside], z[inside]], axis=1).astype(np.float64)
        # asymmetric unit first (the Dirichlet cell of a generic direction), each part inside out
        dots = np.einsum("gab,b,na->ng", ops, _REFERENCE_DIRECTION, cand)
        sector = np.argmax(dots - 1e-9 * np.arange(len(ops)), axis=1)
        order = np.lexsort((np.einsum("na,na->n", cand, cand), sector != 0))
        cand = np.ascontiguousarray(cand[order])
        accepted, start, points = _select_orbits(cand, ops, n, MIN_SEPARATION_PX)
        self.representatives = cand[accepted]  # (k, 3) offsets x, y, z
        self._start = start
        self._points = points
        self._cell_start: np.ndarray | None = None
        self._owner: np.ndarray | None = None
        self._points_by_cell: np.ndarray | None = None
        self._preconditioner_setup()
        # z-sorted copy for the parallel scatter: slabs of >= 2 rho + 1 voxels never share a voxel
        thickness = int(np.ceil(2.0 * KERNEL_RADIUS_PX)) + 1
        owner = np.repeat(np.arange(len(accepted), dtype=np.int64), np.diff(start))
        slab = np.floor((points[:, 2] + c) / thickness).astype(np.int64)
        order_z = np.argsort(slab, kind="stable")
        self._points_z = np.ascontiguousarray(points[order_z])
        self._owner_z = owner[order_z]
        counts = np.bincount(slab, minlength=int(slab.max(initial=0)) + 1)
        self._slab_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.last = ProjectionInfo(0, 0.0)

    def _preconditioner_setup(self) -> None:
        # Away from the boundaries of the asymmetric unit the normal matrix acts on the
        # representatives (voxel centres) as G times a convolution with the kernel's lattice
        # autocorrelation; its inverse, applied by FFT, is the preconditioner.
        n = self.box_size
        rho = self.kernel_radius_px
        w = int(np.ceil(rho))
        offs = np.arange(-w, w + 1)
        zz, yy, xx = np.meshgrid(offs, offs, offs, indexing="ij")
        d2 = (xx**2 + yy**2 + zz**2).astype(np.float64)
        kern = np.where(d2 < rho * rho, (1.0 - d2 / (rho * rho)) ** 3, 0.0)
        wrapped = np.zeros((n, n, n))
        wrapped[zz % n, yy % n, xx % n] = kern
        symbol = np.abs(np.fft.rfftn(wrapped)) ** 2 * len(self.operators)
        self._inv_symbol = 1.0 / np.maximum(symbol, 1e-3 * symbol.max())
        idx = self.representatives.astype(np.int64) + n // 2
        self._rep_index = (idx[:, 2], idx[:, 1], idx[:, 0])

    def _precondition(self, r: np.ndarray) -> np.ndarray:
        n = self.box_size
        grid = np.zeros((n, n, n))
        grid[self._rep_index] = r
        out = np.fft.irfftn(np.fft.rfftn(grid) * self._inv_symbol, s=(n, n, n), axes=(0, 1, 2))
        return out[self._rep_index]

    # -------------------------------------------------------------- basis operations
    @property
    def n_functions(self) -> int:
        """Dimension of the subspace (number of orbit representatives)."""
        return int(self._start.size - 1)

    @property
    def orbit_points(self) -> np.ndarray:
        """``(M, 3)`` distinct orbit points of all representatives (voxel offsets x, y, z)."""
        return self._points

    def _check(self, volume: np.ndarray) -> np.ndarray:
        vol = np.asarray(volume)
        n = self.box_size
        if vol.shape != (n, n, n):
            raise ValueError(f"volume shape {vol.shape} does not match the subspace's box ({n}, {n}, {n})")
        return np.ascontiguousarray(vol, dtype=np.float64)

    def analyse(self, volume: np.ndarray) -> np.ndarray:
        """``Phi^T x``: the inner product of the map with every basis function, ``(k,)`` float64."""
        out = np.empty(self.n_functions)
        _analyse(self._check(volume), self._points, self._start, self.kernel_radius_px, out)
        return out

    def synthesize(self, coefficients: np.ndarray) -> np.ndarray:
        """``Phi a``: the map (float64 ``(N, N, N)``) of the symmetric function with these coefficients."""
        a = np.ascontiguousarray(coefficients, dtype=np.float64)
        if a.shape != (self.n_functions,):
            raise ValueError(f"expected {self.n_functions} coefficients, got shape {a.shape}")
        out = np.zeros((self.box_size,) * 3)
        _synthesize(a, self._points_z, self._owner_z, self._slab_start, self.kernel_radius_px, out)
        return out

    def coefficients(self, volume: np.ndarray, tol: float = 1e-7, max_iter: int = 2000) -> np.ndarray:
        """Least-squares coefficients ``argmin_a ||Phi a - x||``: preconditioned conjugate gradients on
        the normal equations (float64), stopped at relative residual ``tol``. The outcome of the
        solve is kept in :attr:`last`.

        Whatever the tolerance, ``Phi a`` is exactly symmetric; the tolerance only decides how
        close it comes to the orthogonal projection (about ``tol`` relative, so projecting twice
        changes a map by about ``tol``)."""
        b = self.analyse(volume)
        x = np.zeros_like(b)
        b_norm = float(np.linalg.norm(b))
        if b_norm == 0.0:
            self.last = ProjectionInfo(0, 0.0)
            return x
        r = b.copy()
        z = self._precondition(r)
        p = z.copy()
        rz = float(r @ z)
        rel = 1.0
        it = 0
        for it in range(1, max_iter + 1):
            ap = self.analyse(self.synthesize(p))
            alpha = rz / float(p @ ap)
            x += alpha * p
            r -= alpha * ap
            rel = float(np.linalg.norm(r)) / b_norm
            if rel <= tol:
                break
            z = self._precondition(r)
            rz_new = float(r @ z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        else:
            log.warning("symmetric projection: conjugate gradients stopped after %d iterations at relative "
                        "residual %.2e (asked for %.1e)", max_iter, rel, tol)
        self.last = ProjectionInfo(it, rel)
        return x

    def project(self, volume: np.ndarray, tol: float = 1e-7) -> np.ndarray:
        """The orthogonal projection of a map onto the symmetric subspace.

        Parameters
        ----------
        volume
            ``(N, N, N)`` map indexed ``[z, y, x]``.
        tol
            Relative residual of the normal equations at which the solver stops.

        Returns
        -------
        numpy.ndarray
            ``(N, N, N)``, float32 (float64 if ``volume`` is float64): grid samples of an exactly
            symmetric function, the closest such map to ``volume`` in the least-squares sense.
        """
        out = self.synthesize(self.coefficients(volume, tol=tol))
        return out if np.asarray(volume).dtype == np.float64 else out.astype(np.float32)

    def evaluate(self, coefficients: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The symmetric function ``sum_q a_q phi_q`` at arbitrary points.

        Parameters
        ----------
        coefficients
            ``(k,)`` from :meth:`coefficients`.
        points
            ``(m, 3)`` positions ``(x, y, z)`` in voxels from the box centre ``N // 2``.

        Returns
        -------
        numpy.ndarray
            ``(m,)`` float64.
        """
        if self._cell_start is None:
            n = self.box_size
            grid = n + 3
            c = n // 2
            owner = np.repeat(np.arange(self.n_functions), np.diff(self._start))
            idx = np.floor(self._points + 0.5).astype(np.int64) + c + 1
            cell = (idx[:, 2] * grid + idx[:, 1]) * grid + idx[:, 0]
            order = np.argsort(cell, kind="stable")
            counts = np.bincount(cell, minlength=grid**3)
            self._cell_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._points_by_cell = np.ascontiguousarray(self._points[order])
            self._owner = owner[order].astype(np.int64)
        a = np.ascontiguousarray(coefficients, dtype=np.float64)
        q = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
        out = np.empty(q.shape[0])
        _evaluate(a, self._points_by_cell, self._owner, self._cell_start, self.box_size, q,
                  self.kernel_radius_px, out)
        return out

    def invariance_errors(self, volume: np.ndarray) -> np.ndarray:
        """How far a map is from invariant under each operator, measured with its symmetric interpolant.

        The map's least-squares fit ``f = sum_q a_q phi_q`` is evaluated at ``R_g r`` for every voxel
        centre ``r`` of the box and compared with the map at ``r``:
        ``||f(R_g r) - x(r)|| / ||x||`` per operator. For a map in the subspace ``f`` interpolates it
        and is exactly invariant, so every entry is zero up to the solver tolerance and float32
        rounding; for any other map every entry is at least its relative distance to the subspace.

        Returns
        -------
        numpy.ndarray
            ``(G,)`` float64.
        """
        vol = self._check(volume)
        norm = float(np.linalg.norm(vol))
        if norm == 0.0:
            return np.zeros(len(self.operators))
        a = self.coefficients(vol)
        n = self.box_size
        z, y, x = np.mgrid[:n, :n, :n] - n // 2
        grid = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(np.float64)
        errors = np.empty(len(self.operators))
        for g, rot in enumerate(self.operators):
            values = self.evaluate(a, grid @ rot.T).reshape(n, n, n)
            errors[g] = float(np.linalg.norm(values - vol)) / norm
        return errors


@functools.lru_cache(maxsize=4)
def _cached_subspace(box_size: int, group: str, radius_px: float | None) -> SymmetricSubspace:
    return SymmetricSubspace(box_size, symmetry_operators(group), radius_px)


def symmetric_subspace(box_size: int, group: str, radius_px: float | None = None) -> SymmetricSubspace:
    """The :class:`SymmetricSubspace` of a named point group (built once per process and size)."""
    return _cached_subspace(int(box_size), parse_symmetry_name(group),
                            None if radius_px is None else float(radius_px))


def project_to_group(volume: np.ndarray, group: str, radius_px: float | None = None) -> np.ndarray:
    """Exact projection of a map onto the maps with the symmetry of ``group`` (identity for C1).

    See :class:`SymmetricSubspace`; ``radius_px`` defaults to ``N // 2 - 1``.
    """
    vol = np.asarray(volume)
    if symmetry_order(group) == 1:
        return vol.astype(np.float64 if vol.dtype == np.float64 else np.float32, copy=True)
    return symmetric_subspace(vol.shape[0], group, radius_px).project(vol)
