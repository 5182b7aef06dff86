"""relion_mask_create semantics (threshold, strict-< extension, shrink, raised-cosine edge), the
automatic threshold, spherical masks and the worst case for the distance transforms."""

import numpy as np
import pytest

from numba_recon.errors import InputError
from numba_recon.evaluate.mask import auto_threshold, create_mask, spherical_mask


def relion_reference(binary, extend, width):
    """RELION's autoMask with explicit nearest-neighbour distances between voxel centres (k-d tree,
    independent of the distance transform under test)."""
    from scipy.spatial import cKDTree

    n = binary.shape[0]
    grid = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)

    def min_dist(target):
        d, _ = cKDTree(grid[target.ravel()]).query(grid)
        return d.reshape(binary.shape)

    b = binary.copy()
    if extend > 0:
        b = b | (min_dist(b) < extend)
    elif extend < 0:
        b = b & ~(min_dist(~b) < -extend)
    out = b.astype(float)
    if width > 0:
        d = min_dist(b)
        edge = ~b & (d < width)
        out[edge] = 0.5 + 0.5 * np.cos(np.pi * d[edge] / width)
    return out


@pytest.mark.parametrize("extend,width", [(2.5, 4.0), (-1.5, 3.0), (0.0, 5.0), (3.0, 0.0)])
def test_create_mask_matches_brute_force_relion(rng, extend, width):
    n = 18
    vol = np.zeros((n, n, n), np.float32)
    vol[5:11, 6:12, 4:13] = rng.uniform(0.5, 1.0, (6, 6, 9))
    vol[12:14, 3:5, 10:12] = 1.0  # a second, separate piece
    binary = vol >= 0.5
    mask = create_mask(vol, 0.5, extend, width)
    assert mask.dtype == np.float32 and mask.min() >= 0 and mask.max() <= 1
    np.testing.assert_allclose(mask, relion_reference(binary, extend, width), atol=1e-6)


def test_extension_is_strict_and_edge_values_at_known_distances():
    n, c = 21, 10
    vol = np.zeros((n, n, n), np.float32)
    vol[c, c, c] = 1.0
    # extend 2: distance 1, sqrt 2, sqrt 3 join; distance exactly 2 does not (strict <)
    m = create_mask(vol, 0.5, extend_px=2)
    assert m[c, c, c + 1] == 1 and m[c, c + 1, c + 1] == 1 and m[c + 1, c + 1, c + 1] == 1
    assert m[c, c, c + 2] == 0
    assert create_mask(vol, 0.5, extend_px=2.01)[c, c, c + 2] == 1
    # soft edge 4 around the single voxel: 0.5 + 0.5 cos(pi d / 4)
    s = create_mask(vol, 0.5, soft_edge_px=4)
    assert s[c, c, c] == 1
    assert s[c, c, c + 1] == pytest.approx(0.5 + 0.5 * np.cos(np.pi / 4), abs=1e-6)  # 0.853553
    assert s[c, c, c + 2] == pytest.approx(0.5, abs=1e-6)
    assert s[c, c, c + 3] == pytest.approx(0.5 - 0.5 * np.cos(np.pi / 4), abs=1e-6)  # 0.146447
    assert s[c, c + 3, c + 4] == 0  # distance 5
    assert s[c, c, c + 4] == 0  # distance exactly 4: strict <
    assert s[c, c + 2, c + 2] == pytest.approx(0.5 + 0.5 * np.cos(np.pi * np.sqrt(8) / 4), abs=1e-6)


def test_threshold_is_inclusive_and_shrink_removes_layers():
    vol = np.zeros((15, 15, 15), np.float32)
    vol[3:12, 3:12, 3:12] = 0.25  # a 9^3 cube exactly at the threshold
    assert create_mask(vol, 0.25).sum() == 9 ** 3
    # shrink 2: surface voxels have a 0 at distance 1 (< 2) and go; the next layer's nearest 0 is at 2
    assert create_mask(vol, 0.25, extend_px=-2).sum() == 7 ** 3
    assert create_mask(vol, 0.25, extend_px=-2.5).sum() == 5 ** 3
    with pytest.raises(InputError, match="removes the whole mask"):
        create_mask(vol, 0.25, extend_px=-6)


def test_create_mask_errors_and_lowpass(rng):
    vol = rng.standard_normal((16, 16, 16)).astype(np.float32)
    with pytest.raises(InputError, match="no voxel reaches"):
        create_mask(vol, 100.0)
    with pytest.raises(InputError, match="pixel size"):
        create_mask(vol, 0.0, lowpass_angstrom=10)
    with pytest.raises(InputError, match="negative"):
        create_mask(vol, 0.0, soft_edge_px=-1)
    # the low-pass smooths the noise before thresholding: fewer isolated islands
    raw = create_mask(vol, 0.5)
    smooth = create_mask(vol, 0.05, lowpass_angstrom=8, pixel_size_angstrom=1.0)
    from scipy import ndimage

    assert ndimage.label(smooth > 0)[1] < ndimage.label(raw > 0)[1]


@pytest.mark.timeout(300)
def test_mask_of_scattered_seeds_box_128():
    # worst case for the distance transforms: scattered seeds, so the mask spans the whole box
    n = 128
    gen = np.random.default_rng(0)
    vol = np.zeros((n, n, n), np.float32)
    idx = gen.integers(0, n, size=(300, 3))
    vol[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    m = create_mask(vol, 0.5, extend_px=3, soft_edge_px=6)
    assert 0.0 < m.mean() < 1.0


def blob_map(n, amplitude=1.0, sigma=None):
    idx = np.arange(n) - n // 2
    r2 = idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2
    sigma = sigma or n / 10
    return (amplitude * np.exp(-r2 / (2 * sigma ** 2))).astype(np.float32), r2


def test_auto_threshold_noise_free_and_noisy(rng):
    n = 48
    blob, r2 = blob_map(n)
    corners = r2 > (n // 2) ** 2
    # noise-free: 20 % of the peak above the (zero) solvent
    t = auto_threshold(blob)
    assert t == pytest.approx(0.2 * np.percentile(blob, 99.99), rel=1e-4)
    m = create_mask(blob, t)
    assert m[n // 2, n // 2, n // 2] == 1 and not m[corners].any()
    # noisy: the threshold clears the solvent noise (5 robust sigma) and still finds the particle
    noisy = blob + 0.08 * rng.standard_normal(blob.shape).astype(np.float32)
    t = auto_threshold(noisy)
    assert t >= 5 * 0.08 * 0.95
    assert np.mean(noisy[corners] >= t) < 1e-4
    assert noisy[n // 2, n // 2, n // 2] >= t
    # an offset solvent level shifts the threshold by the same amount
    assert auto_threshold(noisy + 10.0) == pytest.approx(t + 10.0, abs=1e-3)
    with pytest.raises(InputError, match="no density above"):
        auto_threshold(np.ones((16, 16, 16), np.float32))


def test_spherical_mask_values():
    m = spherical_mask(32, 8, 4)
    c = 16
    assert m.dtype == np.float32 and m.shape == (32, 32, 32)
    assert m[c, c, c] == 1 and m[c, c, c + 8] == 1
    assert m[c, c, c + 10] == pytest.approx(0.5, abs=1e-6)
    assert m[c, c, c + 11] == pytest.approx(0.5 - 0.5 * np.cos(np.pi / 4), abs=1e-6)
    assert m[c, c, c + 12] == 0 and m[0, 0, 0] == 0
    hard = spherical_mask(31, 5)
    assert set(np.unique(hard)) == {0.0, 1.0}
    assert hard.sum() == sum(1 for z in range(31) for y in range(31) for x in range(31)
                             if (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 25)
