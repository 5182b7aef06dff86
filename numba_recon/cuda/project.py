"""Voxel-driven forward projection on the GPU: ``out[b] += P_b volume``.

Thread mapping
--------------
The volume is cut into bricks of ``8 x 8 x depth`` voxels (``depth = threads_per_block // 64``);
each thread owns one voxel of its block's brick, reads it once and splats it into the images of its
block's slice of the batch. The grid is ``(brick_blocks, slices)``: ``blockIdx.x`` walks the bricks
(grid-stride loop), ``blockIdx.y`` picks a contiguous, ``GROUP``-aligned slice of the images.

Image slices
------------
With few bricks (box 32 has 64 bricks of 8 x 8 x 8) one block per brick leaves most of a GPU idle,
so the batch is split too. :func:`launch_grid` cuts the ``G = ceil(b / GROUP)`` image groups into
slices of ``p = max(1, G // ceil(TARGET_BLOCKS / brick_blocks))`` groups, ``ceil(G / p)`` slices:
the grid reaches ``TARGET_BLOCKS`` (4 x 132: two waves of two resident 512-thread blocks on each
of the 132 SMs of an H100) whenever the batch has enough groups, and stays one slice when the
bricks alone reach it. The kernel only reads ``gridDim.y``: slice ``s`` covers images
``[s p GROUP, min(b, (s + 1) p GROUP))`` with ``p = ceil(G / gridDim.y)``, which is right for any
``gridDim.y``. Every (voxel, image) pair is splatted by exactly one block, so the split changes
only the float32 summation order.

Privatisation
-------------
A brick of at most 8 x 8 x 8 voxels projects, whatever the rotation, inside a 15 x 15 pixel
window around the projection of its centre (half-diagonal ``3.5 * sqrt(3) < 6.07`` pixels plus the
bilinear corner). The block therefore splats ``GROUP`` images at a time into ``GROUP`` shared
``16 x 16`` tiles, then flushes each non-zero tile pixel to the image with one global
``atomic.add``: about 10-20x fewer global atomics than splatting directly. A corner that would
fall outside its tile (only possible for a non-orthonormal matrix) goes straight to global
memory, so the result is correct for any matrix.

Warp aggregation
----------------
A float32 ``atomic.add`` on shared memory is a compare-and-swap retry loop on sm_90, and its cost
grows with the number of lanes that hit the same address, which depends on the view: looking
along x, the 8 voxels of a warp row land on the same pixel. A warp (8 x 4 voxels of one plane)
therefore groups its lanes by the tile pixel of their top-left corner (``match_any_sync``). A lane
alone in its group adds its four corners itself; in a larger group every lane but the lowest
writes its four corner weights to a warp-private shared slab, and after ``syncwarp`` the lowest
lane (the leader) sums them and does the group's four atomic adds. Lanes whose voxel is outside
the support or whose corner leaves the tile take part in every warp-wide call with a key no other
lane has. A warp none of whose voxels contributes skips the splat loop (``any_sync``).

Numba's CUDA simulator has none of the warp intrinsics; there the three used here are replaced
by Python equivalents that meet the 32 lanes of the warp at a barrier.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np

from numba_recon import kernel_geometry as kg
from numba_recon.contract import support_limit
from numba_recon.cuda._checks import brick_depth, device_f32
from numba_recon.cuda._target import SIMULATOR, cuda, inline_device_functions

#: Images splatted per shared-memory pass (tiles of GROUP x TILE x TILE float32 = 16 KiB).
GROUP = 16
#: Edge of a shared tile in pixels; holds the footprint of an 8 x 8 x 8 brick.
TILE = 16
#: Length of the flat shared array holding the GROUP tiles.
TILES_FLAT = GROUP * TILE * TILE
#: The tile starts this many pixels before the floor of the projected brick centre.
TILE_MARGIN = 7
#: Default block size: 8 x 8 x 8 bricks.
DEFAULT_THREADS_PER_BLOCK = 512
#: Upper bound of the grid's brick dimension; larger volumes are covered by the grid-stride loop.
MAX_BLOCKS = 65535
#: Blocks the launcher aims for when the bricks alone are fewer: two waves of the two 512-thread
#: blocks an SM holds at 64 registers per thread (see the launch bounds), on an H100 SXM's 132 SMs.
TARGET_BLOCKS = 4 * 132
#: Lanes per warp; warps per block at the largest block size (512 threads).
WARP = 32
MAX_WARPS = 512 // WARP
#: Corner weights per lane in the aggregation slab.
CORNERS = 4
#: Aggregation slab: two buffers (alternating images) x warps x corners x lanes, float32 (16 KiB).
SLAB_FLAT = 2 * MAX_WARPS * CORNERS * WARP

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
# lane masks are uint32 and slab offsets unsigned: no negative-index handling, no int/uint mixes
_U0 = np.uint32(0)
_U1 = np.uint32(1)
_UWARP = np.uint32(WARP)
_FULL_MASK = np.int32(-1)             # all 32 lanes (blocks are whole warps)
# At most 512 threads and at least two blocks per SM: caps the kernel at 64 registers per thread
# (without it ptxas takes about 70, which leaves one 512-thread block per SM). The simulator's jit
# takes no launch bounds.
_JIT_OPTIONS: dict[str, Any] = {} if SIMULATOR else {"launch_bounds": (512, 2)}

# the shared geometry (numba_recon.kernel_geometry) as the kernel calls it
(_brick_layout, _brick_centre, _brick_outside, _brick_voxel, _stage_rows, _image_position, _staged_corner,
 _bilinear_weights) = inline_device_functions(
    kg.brick_layout, kg.brick_centre, kg.brick_outside, kg.brick_voxel, kg.stage_rows, kg.image_position,
    kg.staged_corner, kg.bilinear_weights)


#: In the simulator, whether the warp intrinsics are emulated (lanes exchange keys at a Python
#: barrier, so the aggregation itself runs) or every lane is its own group (the same images up to
#: float32 summation order, many times faster: a barrier of 32 OS threads costs milliseconds).
#: The aggregation tests set it; on a GPU the real intrinsics always run.
SIMULATE_WARPS = False

if SIMULATOR:
    # Python stand-ins for the warp intrinsics (the simulator runs one OS thread per CUDA thread).
    # The 32 lanes of a warp meet at a threading.Barrier kept per launch (the simulator's ``cuda``
    # module of the launch, which it swaps into this module while a kernel or device function of
    # it runs), block and warp; like the real intrinsics they need every lane of the warp.
    _SIM_LOCK = threading.Lock()
    _SIM_WARPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _SIM_LANE = threading.local()  # each lane's count of exchanges, mod 2

    class _SimWarp:
        def __init__(self) -> None:
            self.barrier = threading.Barrier(WARP)
            # two sets of slots, used by alternate exchanges: a set is rewritten only after the
            # next barrier, which no lane passes before every lane has read it
            self.slots: list[list[Any]] = [[None] * WARP, [None] * WARP]

        def exchange(self, lane: int, value: Any) -> list[Any]:
            phase = getattr(_SIM_LANE, "phase", 0)
            _SIM_LANE.phase = phase ^ 1
            slots = self.slots[phase]
            slots[lane] = value
            self.barrier.wait()
            return slots

    def _sim_warp() -> tuple[_SimWarp, int]:
        tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        key = (cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, tid // WARP)
        with _SIM_LOCK:
            per_launch = _SIM_WARPS.setdefault(cuda, {})
            warp = per_launch.get(key)
            if warp is None:
                warp = per_launch[key] = _SimWarp()
        return warp, tid % WARP

    def _sim_lane() -> int:
        tid = cuda.threadIdx.x + cuda.blockDim.x * (cuda.threadIdx.y + cuda.blockDim.y * cuda.threadIdx.z)
        return tid % WARP

    @cuda.jit(device=True)
    def _match_any(key: int) -> int:
        """Lanes of the warp whose ``key`` equals this lane's, as a 32-bit lane mask."""
        if not SIMULATE_WARPS:
            return 1 << _sim_lane()
        warp, lane = _sim_warp()
        keys = warp.exchange(lane, int(key))
        return sum(1 << i for i, k in enumerate(keys) if k == keys[lane])

    @cuda.jit(device=True)
    def _warp_any(pred: bool) -> bool:
        """True when ``pred`` holds on any lane of the warp."""
        if not SIMULATE_WARPS:
            return True  # every warp runs the splat loop; lanes without a value add nothing
        warp, lane = _sim_warp()
        return any(warp.exchange(lane, bool(pred)))

    @cuda.jit(device=True)
    def _warp_sync() -> None:
        """Warp barrier; shared-memory writes before it are visible to the warp after it."""
        if not SIMULATE_WARPS:
            return  # lanes alone in their group read no other lane's slab rows
        warp, _ = _sim_warp()
        warp.barrier.wait()

else:
    @cuda.jit(device=True, inline=True)
    def _match_any(key):
        """Lanes of the warp whose ``key`` equals this lane's, as a 32-bit lane mask."""
        return np.uint32(cuda.match_any_sync(_FULL_MASK, key))

    @cuda.jit(device=True, inline=True)
    def _warp_any(pred):
        """True when ``pred`` holds on any lane of the warp."""
        return cuda.any_sync(_FULL_MASK, pred)

    @cuda.jit(device=True, inline=True)
    def _warp_sync():
        """Warp barrier; shared-memory writes before it are visible to the warp after it."""
        cuda.syncwarp()


@cuda.jit(device=True, inline=True, fastmath=True)
def _splat_global(out, b, x0, y0, fx, fy, val):
    """Bilinear splat of ``val`` at ``(x0 + fx, y0 + fy)`` straight into ``out[b]``, dropping
    corners outside the image."""
    n = out.shape[1]
    gx = _F1 - fx
    gy = _F1 - fy
    if y0 >= 0 and y0 < n:
        if x0 >= 0 and x0 < n:
            cuda.atomic.add(out, (b, y0, x0), gx * gy * val)
        if x0 >= -1 and x0 < n - 1:
            cuda.atomic.add(out, (b, y0, x0 + 1), fx * gy * val)
    if y0 >= -1 and y0 < n - 1:
        if x0 >= 0 and x0 < n:
            cuda.atomic.add(out, (b, y0 + 1, x0), gx * fy * val)
        if x0 >= -1 and x0 < n - 1:
            cuda.atomic.add(out, (b, y0 + 1, x0 + 1), fx * fy * val)


@cuda.jit(fastmath=True, cache=True, **_JIT_OPTIONS)
def _project_kernel(volume, rotations, r2_max, out):
    """``out[b] += P_b volume`` for all ``b``; see the module docstring for the mapping.

    ``volume (N, N, N)``, ``rotations (b, 3, 3)``, ``r2_max`` int32 (largest ``|r|^2`` inside
    the support), ``out (b, N, N)``. Launch a 1-D block of a multiple of 64 threads (at most 512)
    on a 2-D grid: ``gridDim.x`` blocks over the bricks, ``gridDim.y`` image slices.
    """
    # flat tiles: tile g, row ty, column tx at (g * TILE + ty) * TILE + tx
    tile = cuda.shared.array(TILES_FLAT, np.float32)
    # aggregation slab: buffer g & 1, warp w, corner q, lane l at ((buf * MAX_WARPS + w) * CORNERS + q) * WARP + l
    slab = cuda.shared.array(SLAB_FLAT, np.float32)
    rot = cuda.shared.array((GROUP, 6), np.float32)
    origin = cuda.shared.array((GROUP, 2), np.int32)

    n = volume.shape[0]
    nb = rotations.shape[0]
    tid = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    c, cf, depth, nbx, n_bricks, half_z = _brick_layout(n, tpb)
    lane = tid % WARP
    own = np.uint32(1 << lane)        # this lane's bit
    below = np.uint32(own - _U1)      # the bits of the lower lanes
    ulane = np.uint32(lane)
    warp = tid // WARP
    lone_key = np.int32(TILE * TILE + lane)  # a key no other lane has (tile keys are < TILE * TILE)

    # this block's slice of the images, in whole groups (see the module docstring)
    n_groups = (nb + GROUP - 1) // GROUP
    per_slice = (n_groups + cuda.gridDim.y - 1) // cuda.gridDim.y
    img_lo = cuda.blockIdx.y * per_slice * GROUP
    img_hi = min(nb, img_lo + per_slice * GROUP)

    # Tiles start zeroed and every flush re-zeroes what it reads. The first staging barrier
    # below orders these stores before any splat.
    for t in range(tid, TILES_FLAT, tpb):
        tile[t] = _F0

    for brick in range(cuda.blockIdx.x, n_bricks, cuda.gridDim.x):
        # brick centre, as an offset from the box centre (voxels)
        bx, by, bz, ccx, ccy, ccz = _brick_centre(brick, nbx, depth, c, half_z)
        # Skip bricks wholly outside the support sphere (the same decision for the whole block).
        if _brick_outside(ccx, ccy, ccz, half_z, r2_max):
            continue

        j, i, k, rxf, ryf, rzf, inside = _brick_voxel(bx, by, bz, depth, tid, n, c, r2_max)
        val = _F0
        if inside:
            val = volume[k, i, j]
        live = val != _F0
        # whole warps with nothing to splat skip the splat loop (a warp-uniform decision)
        warp_live = _warp_any(live)

        for g0 in range(img_lo, img_hi, GROUP):
            cnt = np.int32(min(GROUP, img_hi - g0))
            if tid < cnt:
                a00, a01, a02, a10, a11, a12 = _stage_rows(rotations, g0 + tid, rot, tid)
                uc, vc = _image_position(a00, a01, a02, a10, a11, a12, ccx, ccy, ccz, cf)
                origin[tid, 0] = np.int32(math.floor(uc)) - TILE_MARGIN
                origin[tid, 1] = np.int32(math.floor(vc)) - TILE_MARGIN
            cuda.syncthreads()

            if warp_live:
                # every lane of the warp runs this loop: it holds the warp-wide calls
                for g in range(cnt):
                    x0, y0, fx, fy = _staged_corner(rot, g, rxf, ryf, rzf, cf)
                    tx = x0 - origin[g, 0]
                    ty = y0 - origin[g, 1]
                    in_tile = live and tx >= 0 and tx < TILE - 1 and ty >= 0 and ty < TILE - 1
                    key = np.int32(ty * TILE + tx) if in_tile else lone_key
                    peers = np.uint32(_match_any(key))
                    w00, w01, w10, w11 = _bilinear_weights(val, fx, fy)
                    # this warp's rows of the slab; buffers alternate between images: a slot is
                    # rewritten two images later, after the next warp barrier, when no lane can
                    # still be reading it
                    row = np.uint32(((g & 1) * MAX_WARPS + warp) * (CORNERS * WARP))
                    leader = np.uint32(peers & below) == _U0   # lowest lane of its group, or alone
                    if not leader:
                        s = row + ulane
                        slab[s] = w00
                        slab[s + _UWARP] = w01
                        slab[s + 2 * _UWARP] = w10
                        slab[s + 3 * _UWARP] = w11
                    _warp_sync()
                    if in_tile:
                        if leader:
                            # add the other members' corners and do the group's four atomic adds
                            others = np.uint32(peers ^ own)
                            while others != _U0:
                                src = row + np.uint32(cuda.ffs(others) - 1)
                                others = np.uint32(others & (others - _U1))
                                w00 += slab[src]
                                w01 += slab[src + _UWARP]
                                w10 += slab[src + 2 * _UWARP]
                                w11 += slab[src + 3 * _UWARP]
                            t = np.uint32(g * (TILE * TILE) + key)
                            cuda.atomic.add(tile, t, w00)
                            cuda.atomic.add(tile, t + _U1, w01)
                            cuda.atomic.add(tile, t + np.uint32(TILE), w10)
                            cuda.atomic.add(tile, t + np.uint32(TILE + 1), w11)
                    elif live:
                        _splat_global(out, g0 + g, x0, y0, fx, fy, val)
            cuda.syncthreads()

            # Flush: one global atomic per touched tile pixel inside the image; re-zero the tile.
            for t in range(tid, cnt * (TILE * TILE), tpb):
                w = tile[t]
                if w != _F0:
                    tile[t] = _F0
                    g = t // (TILE * TILE)
                    p = t - g * (TILE * TILE)
                    ty = p // TILE
                    x = origin[g, 0] + (p - ty * TILE)
                    y = origin[g, 1] + ty
                    if x >= 0 and x < n and y >= 0 and y < n:
                        cuda.atomic.add(out, (g0 + g, y, x), w)
            cuda.syncthreads()


def launch_grid(n: int, nb: int, threads_per_block: int = DEFAULT_THREADS_PER_BLOCK, *,
                image_slices: int | None = None) -> tuple[int, int]:
    """The grid ``(brick_blocks, slices)`` that :func:`project` launches for box ``n``, batch ``nb``.

    ``brick_blocks = min(n_bricks, MAX_BLOCKS)``; the batch's ``G = ceil(nb / GROUP)`` image groups
    are cut into slices of ``p`` groups, ``slices = ceil(G / p)``:

    - by default ``p = max(1, G // W)`` with ``W = ceil(TARGET_BLOCKS / brick_blocks)``, so that
      ``brick_blocks * slices >= TARGET_BLOCKS`` whenever ``G >= W`` (else one group per slice);
      with ``brick_blocks >= TARGET_BLOCKS`` this is one slice, the whole batch;
    - with ``image_slices = S``, ``p = ceil(G / S)``: at most ``S`` slices.

    No slice is empty; the last one may hold fewer groups.
    """
    _, n_bricks = kg.brick_grid(n, brick_depth(threads_per_block))
    brick_blocks = min(n_bricks, MAX_BLOCKS)
    groups = -(-nb // GROUP)
    if groups == 0 or brick_blocks == 0:
        return brick_blocks, 1
    if image_slices is None:
        per_slice = max(1, groups // -(-TARGET_BLOCKS // brick_blocks))
    else:
        if int(image_slices) < 1:
            raise ValueError(f"image_slices must be >= 1, got {image_slices!r}")
        per_slice = -(-groups // int(image_slices))
    return brick_blocks, -(-groups // per_slice)


def project(volume: Any, rotations: Any, radius_px: float, out: Any, *,
            threads_per_block: int = DEFAULT_THREADS_PER_BLOCK, image_slices: int | None = None) -> None:
    """Voxel-driven projection with bilinear splatting, accumulated into ``out`` (asynchronous).

    For each voxel ``(k, i, j)`` with offset ``r = (j - c, i - c, k - c)``, ``c = N // 2`` and
    ``|r|^2 <= radius_px^2``, the voxel value is splatted with bilinear weights at image position
    ``(u, v) = ((A r)_x + c, (A r)_y + c)`` (u = column, v = row) of ``out[b]``; corners outside the
    image are dropped.

    Parameters
    ----------
    volume
        ``(N, N, N)`` float32 device array, indexed ``[z, y, x]``.
    rotations
        ``(b, 3, 3)`` float32 device array of RELION matrices ``A``.
    radius_px
        Support radius in pixels (``inf`` for the whole box).
    out
        ``(b, N, N)`` float32 device array, caller-zeroed; the projections are added to it.
    threads_per_block
        Block size, a multiple of 64 up to 512 (bricks of ``8 x 8 x threads_per_block/64``).
    image_slices
        Cut the batch into at most this many slices of whole ``GROUP``s, one grid row each;
        ``None`` (default) applies the rule of :func:`launch_grid`. Only the float32 summation
        order depends on it.
    """
    device_f32("volume", volume, (None, None, None))
    n = volume.shape[0]
    device_f32("volume", volume, (n, n, n))
    device_f32("rotations", rotations, (None, 3, 3))
    nb = rotations.shape[0]
    device_f32("out", out, (nb, n, n))
    r2_max = np.int32(support_limit(radius_px, n))
    grid = launch_grid(n, nb, threads_per_block, image_slices=image_slices)
    if nb == 0 or n == 0:
        return
    _project_kernel[grid, threads_per_block](volume, rotations, r2_max, out)
