"""The CUDA forward projector's image slices and warp-aggregated shared-memory adds.

:func:`numba_recon.cuda.project` splits the batch across the grid (``launch_grid``) and sums the
corner weights of lanes that hit the same tile pixel before one leader lane adds them. Both must
leave the result unchanged up to float32 summation order: checked here against the CPU twin
(rotations) or a float64 NumPy reference (non-orthonormal matrices, which the CPU twin rejects),
for random views, axis-aligned views (many lanes of a warp on the same pixel), batch sizes that
are not multiples of ``GROUP``, and several splits. The kernels run in Numba's CUDA simulator
(``NUMBA_RECON_TEST_REAL_GPU=1``: on a GPU), which runs one Python thread per CUDA thread, so boxes
stay at 8-12 and batches at most 33.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from numba_recon import cpu
from numba_recon import cuda as nc
from numba_recon.cuda import _target
from numba_recon.cuda._target import cuda
from numba_recon.cuda.device_check import numpy_project
from numba_recon.cuda.project import (GROUP, TARGET_BLOCKS, TILES_FLAT, _match_any, _project_kernel, _warp_any,
                                      _warp_sync, launch_grid, support_limit)
from numba_recon.geometry import euler_to_matrix, random_rotations

RTOL = 1e-5       # float32 kernels, relative to the largest reference value
DOT_RTOL = 1e-4

simulator_only = pytest.mark.skipif(not _target.SIMULATOR, reason="inspects the CUDA simulator")


@pytest.fixture(autouse=True, scope="module")
def _cuda_backend(make_backend, fast_thread_switching):
    import importlib

    project_module = importlib.import_module("numba_recon.cuda.project")  # the package exports a function of that name
    make_backend("cuda")  # skips, naming the reason, when a requested real GPU is unusable
    # the simulator emulates the warp intrinsics only when asked: these tests check the aggregation
    emulated = project_module.SIMULATE_WARPS
    project_module.SIMULATE_WARPS = True
    yield
    project_module.SIMULATE_WARPS = emulated


def cube_rotations() -> np.ndarray:
    """The 24 rotations of the cube (signed permutation matrices, det +1): ``(24, 3, 3)``."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            a = np.zeros((3, 3))
            a[np.arange(3), perm] = signs
            if np.linalg.det(a) > 0:
                mats.append(a)
    return np.stack(mats)


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def gpu_project(volume: np.ndarray, rot: np.ndarray, radius_px: float, base: np.ndarray | None = None,
                **kwargs) -> np.ndarray:
    """``base + P volume`` through :func:`numba_recon.cuda.project` (``base`` zero by default)."""
    n = volume.shape[0]
    out = nc.to_device(base) if base is not None else nc.zeros((len(rot), n, n))
    nc.project(nc.to_device(f32(volume)), nc.to_device(f32(rot)), radius_px, out, **kwargs)
    return nc.to_host(out)


def cpu_project(volume: np.ndarray, rot: np.ndarray, radius_px: float) -> np.ndarray:
    n = volume.shape[0]
    out = np.zeros((len(rot), n, n), np.float32)
    cpu.project(f32(volume), f32(rot), radius_px, out)
    return out


# ------------------------------------------------------------------------------------------
# the grid rule (host only)


@pytest.mark.parametrize(("n", "nb", "tpb", "grid"), [
    (32, 512, 512, (64, 11)),     # 64 bricks: 11 slices of 3 groups (the last of 2), 704 blocks
    (32, 128, 512, (64, 8)),      # 8 groups: one per slice, the batch allows no more
    (32, 8, 512, (64, 1)),        # one group
    (32, 512, 256, (128, 6)),     # 8 x 8 x 4 bricks: 128 of them, 5 wanted, 32 // 5 = 6 per slice
    (64, 512, 512, (512, 2)),     # 512 bricks: 2 slices reach the target
    (128, 512, 512, (4096, 1)),   # bricks alone fill the GPU: one slice
    (8, 1, 512, (1, 1)),
    (8, 33, 512, (1, 3)),
    (9, 17, 128, (20, 2)),
])
def test_launch_grid_rule(n, nb, tpb, grid):
    got = launch_grid(n, nb, tpb)
    assert got == grid
    blocks, slices = got
    groups = -(-nb // GROUP)
    per = -(-groups // slices)
    assert -(-groups // per) == slices                      # the kernel's split: no empty slice
    if groups >= -(-TARGET_BLOCKS // blocks):
        assert blocks * slices >= TARGET_BLOCKS  # the target is reached when the batch allows


def test_launch_grid_explicit_slices():
    assert launch_grid(8, 40, 512, image_slices=1) == (1, 1)
    assert launch_grid(8, 40, 512, image_slices=2) == (1, 2)   # 2 + 1 groups
    assert launch_grid(8, 40, 512, image_slices=99) == (1, 3)  # at most one per group
    assert launch_grid(8, 0, 512) == (1, 1)
    with pytest.raises(ValueError, match="image_slices"):
        launch_grid(8, 40, 512, image_slices=0)
    with pytest.raises(ValueError, match="threads_per_block"):
        launch_grid(8, 40, 100)


# ------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize(("n", "nb", "tpb", "radius"), [
    (8, 1, 512, 3.5),      # one image, one brick
    pytest.param(8, 33, 512, 3.5, marks=pytest.mark.slow),  # 3 slices of one group, the last holding one image
    pytest.param(9, 17, 128, 4.0, marks=pytest.mark.slow),  # odd box, 20 bricks of 8 x 8 x 2, 2 slices
    pytest.param(12, 5, 512, 5.0, marks=pytest.mark.slow),  # even box, 8 bricks, partial bricks at the edges
])
def test_random_rotations_match_cpu_twin(n, nb, tpb, radius):
    rng = np.random.default_rng(1000 * n + nb)
    rot = f32(random_rotations(nb, rng))
    volume = f32(rng.standard_normal((n, n, n)))
    base = f32(rng.standard_normal((nb, n, n)))  # the kernel accumulates into out
    got = gpu_project(volume, rot, radius, base, threads_per_block=tpb) - base
    assert rel_err(got, cpu_project(volume, rot, radius)) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize(("n", "tpb"), [(8, 512), (9, 128)])
def test_axis_aligned_views_match_cpu_twin(n, tpb):
    # Views along x put the 8 voxels of a warp row on one pixel, views along y the 4 rows of a
    # warp: the largest groups of the aggregation. 24 images = a group and a half, 2 slices.
    rng = np.random.default_rng(n)
    rot = f32(cube_rotations())
    volume = f32(rng.standard_normal((n, n, n)))
    radius = n / 2 - 0.5
    got = gpu_project(volume, rot, radius, threads_per_block=tpb)
    assert rel_err(got, cpu_project(volume, rot, radius)) < RTOL


@pytest.mark.slow
def test_nearly_axis_aligned_views_match_cpu_twin():
    # A fraction of a degree off the axes: lanes of a row mostly share a pixel, but some fall on
    # the next one, so groups of every size occur.
    n = 8
    rng = np.random.default_rng(5)
    tilt = euler_to_matrix(0.3, 0.2, -0.4)
    rot = f32(np.einsum("bij,jk->bik", cube_rotations()[:17], tilt))
    volume = f32(rng.standard_normal((n, n, n)))
    got = gpu_project(volume, rot, 3.5)
    assert rel_err(got, cpu_project(volume, rot, 3.5)) < RTOL


@pytest.mark.slow
def test_non_orthonormal_matrices_match_numpy_reference():
    # Stretched and sheared matrices throw some corners outside the brick's tile: those lanes take
    # the global-memory path while their warp aggregates the rest. The CPU twin accepts rotations
    # only, so the reference is the float64 NumPy projector.
    n, nb = 8, 17
    rng = np.random.default_rng(3)
    rot = random_rotations(nb, rng)
    rot[0::3] *= 1.8
    rot[1::3, 0, :] += 0.9 * rot[1::3, 1, :]
    rot[2] = cube_rotations()[5] * 2.2   # axis-aligned and stretched: whole groups off the tile
    rot = f32(rot)
    volume = f32(rng.standard_normal((n, n, n)))
    got = gpu_project(volume, rot, 3.5)
    assert rel_err(got, numpy_project(volume, rot, 3.5)) < RTOL


@pytest.mark.slow
def test_every_split_gives_the_same_images():
    n, nb = 8, 20   # two groups, the second of 4 images
    rng = np.random.default_rng(11)
    rot = f32(np.concatenate([random_rotations(nb - 4, rng), cube_rotations()[:4]]))
    volume = f32(rng.standard_normal((n, n, n)))
    ref = cpu_project(volume, rot, 3.5)
    one = gpu_project(volume, rot, 3.5, image_slices=1)
    two = gpu_project(volume, rot, 3.5, image_slices=2)
    assert rel_err(one, ref) < RTOL and rel_err(two, ref) < RTOL
    assert rel_err(two, one) < RTOL
    # The kernel reads only gridDim.y: more slices than groups leaves the extra blocks idle.
    out = nc.zeros((nb, n, n))
    r2_max = support_limit(3.5, n)
    _project_kernel[(1, 5), 64](nc.to_device(volume), nc.to_device(rot), r2_max, out)
    assert rel_err(nc.to_host(out), ref) < RTOL


@pytest.mark.slow
def test_backproject_is_adjoint_of_split_project():
    n, nb = 9, 17
    rng = np.random.default_rng(17)
    rot = f32(np.concatenate([random_rotations(nb - 6, rng), cube_rotations()[:6]]))
    x = f32(rng.standard_normal((n, n, n)))
    y = f32(rng.standard_normal((nb, n, n)))
    px = gpu_project(x, rot, 4.0, threads_per_block=128)
    assert launch_grid(n, nb, 128)[1] == 2
    pty = nc.zeros((n, n, n))
    nc.backproject(nc.to_device(y), nc.to_device(rot), 4.0, pty)
    lhs = float(np.vdot(px.astype(np.float64), y))
    rhs = float(np.vdot(x.astype(np.float64), nc.to_host(pty)))
    assert abs(lhs - rhs) <= DOT_RTOL * abs(lhs)


# ------------------------------------------------------------------------------------------
# the aggregation itself (simulator)


@simulator_only
def test_simulator_warp_stand_ins():
    @cuda.jit
    def probe(keys, preds, peers, any_out):
        tid = cuda.threadIdx.x
        peers[tid] = _match_any(keys[tid])
        _warp_sync()
        any_out[tid] = 1 if _warp_any(preds[tid] != 0) else 0

    keys = np.arange(64, dtype=np.int32) % 3
    keys[32:] = 7                                   # second warp: one group of 32
    preds = np.zeros(64, np.int32)
    preds[40] = 1                                   # only the second warp has a true lane
    peers = np.zeros(64, np.int64)
    any_out = np.zeros(64, np.int32)
    probe[1, 64](keys, preds, peers, any_out)
    lanes = np.arange(32)
    for t in range(32):
        assert peers[t] == sum(1 << int(i) for i in lanes[lanes % 3 == t % 3])
    assert np.all(peers[32:] == 0xFFFFFFFF)
    np.testing.assert_array_equal(any_out, np.repeat([0, 1], 32))


def _tile_keys_per_warp(n: int, rot: np.ndarray, radius: float) -> tuple[int, int]:
    """(corner adds without aggregation, with it) for one 8 x 8 x 8 brick (``n <= 8``) and
    rotations that map voxels to whole pixels, so that float32 floors are exact."""
    c = n // 2
    k, i, j = np.meshgrid(np.arange(8), np.arange(8), np.arange(8), indexing="ij")
    inside = (k < n) & (i < n) & (j < n) & ((j - c) ** 2 + (i - c) ** 2 + (k - c) ** 2 <= radius ** 2)
    warp = (k * 64 + i * 8 + j) // 32
    r = np.stack([j - c, i - c, k - c], axis=-1)
    lanes = groups = 0
    for a in rot.astype(np.int64):
        x0 = r @ a[0]
        y0 = r @ a[1]
        keys = set(zip(warp[inside], x0[inside], y0[inside]))
        lanes += int(inside.sum())
        groups += len(keys)
    return 4 * lanes, 4 * groups


@pytest.mark.slow
@simulator_only
def test_lanes_on_the_same_pixel_make_one_shared_add(monkeypatch):
    from numba.cuda.simulator import kernelapi

    counts = {"shared": 0}
    original = kernelapi.FakeCUDAAtomic.add

    def counting_add(self, array, index, val):
        if isinstance(array, np.ndarray) and array.size == TILES_FLAT:
            counts["shared"] += 1
        return original(self, array, index, val)

    monkeypatch.setattr(kernelapi.FakeCUDAAtomic, "add", counting_add)
    n = 8
    rot = cube_rotations()
    rng = np.random.default_rng(2)
    volume = f32(rng.uniform(0.5, 1.5, (n, n, n)))   # no zero voxels: every support lane splats
    got = gpu_project(volume, rot, 3.5)
    assert rel_err(got, cpu_project(volume, rot, 3.5)) < RTOL
    unaggregated, expected = _tile_keys_per_warp(n, rot, 3.5)
    assert counts["shared"] == expected    # four adds per group of lanes on the same pixel
    # along x (third row +-e_x) the 8 voxels of a warp row share a pixel, along y its 4 rows do,
    # along z no two lanes of a warp do
    along = np.abs(rot[:, 2, :]).argmax(axis=1)
    for axis, at_most in ((0, 1 / 4), (1, 1 / 2), (2, 1.0)):   # rows cut by the sphere: 0.21, 0.41
        lanes, groups = _tile_keys_per_warp(n, rot[along == axis], 3.5)
        assert groups <= at_most * lanes, (axis, groups, lanes)
    assert expected < 0.6 * unaggregated


# ------------------------------------------------------------------------------------------
# compile-only: the warp intrinsics reach the PTX for sm_90 and sm_80

_PTX_COUNTS = """
from numba_recon.cuda.compile_check import KERNELS
kernel, signature, fastmath = KERNELS["project"]
counts = {}
for cc in ((9, 0), (8, 0)):
    ptx, _ = _target.cuda.compile_ptx(kernel.py_func, signature, cc=cc, fastmath=fastmath,
                                      launch_bounds=kernel.targetoptions.get("launch_bounds"))
    counts[f"sm{cc[0]}{cc[1]}"] = {
        "shared_adds": len(re.findall(r"\\b(?:atom|red)\\.shared\\.add\\.f32\\b", ptx)),
        "match": len(re.findall(r"\\bmatch\\.any\\.sync\\.b32\\b", ptx)),
        "vote_any": len(re.findall(r"\\bvote\\.sync\\.any\\.pred\\b", ptx)),
        "warp_sync": len(re.findall(r"\\bbar\\.warp\\.sync\\b", ptx)),
        "shfl": len(re.findall(r"\\bshfl\\.", ptx)),
        "f64": len(re.findall(r"\\.f64\\b", ptx)),
        "local": len(re.findall(r"\\.local\\b", ptx)),
        "maxntid": bool(re.search(r"\\.maxntid\\s+512", ptx)),
        "minnctapersm": bool(re.search(r"\\.minnctapersm\\s+2", ptx)),
    }
return counts
"""


@pytest.mark.slow
def test_project_kernel_compiles_with_warp_aggregation(compile_only):
    counts = compile_only(_PTX_COUNTS)
    for target, c in counts.items():
        # the four corner adds exist once, after the leader's sum; no float64, nothing spilled
        assert c["shared_adds"] == 4, (target, c)
        assert c["match"] == 1 and c["vote_any"] == 1 and c["warp_sync"] == 1, (target, c)
        assert c["f64"] == 0 and c["local"] == 0, (target, c)
        # launch bounds (512 threads, 2 blocks per SM) keep it at 64 registers
        assert c["maxntid"] and c["minnctapersm"], (target, c)
