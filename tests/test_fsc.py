"""FSC with RELION's shells, the first-crossing 0.143 rule, phase randomisation and the FSC plot."""

import csv

import numpy as np
import pytest

from numba_recon.errors import InputError, OutputError
from numba_recon.evaluate.fsc import (FSCCurve, fsc, plot_fsc, randomize_phases_beyond, resolution_at,
                                      shell_counts, write_fsc_csv)


def brute_force_fsc(a, b):
    """Full complex FFT, shells ROUND(|k|) with RELION's halves-away-from-zero rounding."""
    n = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(n, 1.0 / n)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = np.floor(r + 0.5).astype(int)
    out = []
    for i in range(n // 2 + 1):
        s = shell == i
        num = (fa[s] * fb[s].conj()).real.sum()
        out.append(num / np.sqrt((np.abs(fa[s]) ** 2).sum() * (np.abs(fb[s]) ** 2).sum()))
    return np.array(out)


@pytest.mark.parametrize("n", [16, 15])
def test_fsc_equals_full_transform_fsc(rng, n):
    a = rng.standard_normal((n, n, n)).astype(np.float32) + 0.3
    b = (a + 1.5 * rng.standard_normal((n, n, n))).astype(np.float32)
    np.testing.assert_allclose(fsc(a, b), brute_force_fsc(a.astype(np.float64), b.astype(np.float64)), atol=1e-5)


def test_shell_membership_is_relion_round():
    # shell 0 = DC only; shell 1 = |k|^2 in {1, 2} (6 + 12 vectors); |k|^2 = 3 (|k| = 1.73) is shell 2
    counts = shell_counts(32)
    assert counts[0] == 1
    assert counts[1] == 18
    assert counts[2] == 8 + 6 + 24 + 24  # |k|^2 = 3, 4, 5, 6
    assert shell_counts(15).size == 8 and shell_counts(16).size == 9


def test_fsc_of_a_map_with_itself_is_one(rng):
    a = rng.standard_normal((24, 24, 24)).astype(np.float32) + 2.0
    curve = fsc(a, a)
    assert curve.shape == (13,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-6)
    # a positive scale factor does not change the correlation, a sign flip negates it
    np.testing.assert_allclose(fsc(a, 3.0 * a), 1.0, atol=1e-6)
    np.testing.assert_allclose(fsc(a, -a), -1.0, atol=1e-6)


def test_fsc_of_independent_noise_is_near_zero(rng):
    n = 48
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = rng.standard_normal((n, n, n)).astype(np.float32)
    curve = fsc(a, b)[2:]
    counts = shell_counts(n)[2:]
    assert abs(curve.mean()) < 0.01
    # each shell holds counts/2 independent complex pairs: standard deviation about 1/sqrt(counts)
    assert np.all(np.abs(curve) < 5.0 / np.sqrt(counts))


def test_masked_fsc_multiplies_both_maps(rng):
    n = 20
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = rng.standard_normal((n, n, n)).astype(np.float32)
    m = rng.uniform(0, 1, (n, n, n)).astype(np.float32)
    np.testing.assert_allclose(fsc(a, b, m), fsc(a * m, b * m), atol=1e-6)


def test_fsc_input_errors(rng):
    a = rng.standard_normal((16, 16, 16)).astype(np.float32)
    with pytest.raises(InputError, match="different boxes"):
        fsc(a, a[:15, :15, :15])
    with pytest.raises(InputError, match="not a cube"):
        fsc(a[:, :, :8], a[:, :, :8])
    bad = a.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fsc(a, bad)
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        fsc(a, a, np.full(a.shape, 1.5, np.float32))
    with pytest.raises(InputError, match="shape"):
        fsc(a, a, np.ones((8, 8, 8), np.float32))


# ----------------------------------------------------------------------------------------------
# RELION's resolution rule
# ----------------------------------------------------------------------------------------------

def hand_curve():
    """Box 64: FSC falls below 0.143 first at shell 11, rebounds to 0.3 at shell 12, then stays low."""
    curve = np.zeros(33)
    curve[:11] = np.linspace(1.0, 0.2, 11)  # shell 10 = 0.2
    curve[11] = 0.1
    curve[12] = 0.3
    curve[13:] = 0.05
    return curve


def test_resolution_is_last_shell_before_first_drop():
    curve = hand_curve()
    # last shell before the first FSC < 0.143 is shell 10: 64 * 1.5 / 10 = 9.6 A
    assert resolution_at(curve, 64, 1.5) == pytest.approx(9.6)
    # the rebound at shell 12 is ignored (the "highest shell above" rule would give 8.0 A)
    assert resolution_at(curve, 64, 1.5) != pytest.approx(64 * 1.5 / 12)
    # linear interpolation in frequency between shell 10 (0.2) and shell 11 (0.1)
    assert resolution_at(curve, 64, 1.5, interpolate=True) == pytest.approx(96.0 / (10 + 0.57))
    # the 0.5 threshold: shells go 1.0, 0.92, ..., shell 6 = 0.52, shell 7 = 0.44
    assert resolution_at(curve, 64, 1.5, threshold=0.5) == pytest.approx(96.0 / 6)


def test_resolution_edge_cases():
    never = np.linspace(1.0, 0.5, 33)
    assert resolution_at(never, 64, 1.5) == pytest.approx(3.0)  # Nyquist, 2 * angpix
    assert resolution_at(np.linspace(1.0, 0.5, 17), 33, 1.5) == pytest.approx(33 * 1.5 / 16)  # odd box
    at_once = np.array([1.0] + [0.1] * 32)
    assert resolution_at(at_once, 64, 1.5) == pytest.approx(96.0)  # shell 1 already below: box size
    # shell 0 is not part of the scan
    no_dc = hand_curve()
    no_dc[0] = -1.0
    assert resolution_at(no_dc, 64, 1.5) == pytest.approx(9.6)
    with pytest.raises(InputError, match="shells"):
        resolution_at(hand_curve(), 62, 1.5)


def test_fsc_curve_axis_and_csv(tmp_path):
    curve = FSCCurve.from_values(hand_curve(), 64, 1.5)
    np.testing.assert_array_equal(curve.spectral_index, np.arange(33))
    assert curve.resolution_angstrom[0] == 999.0
    assert curve.resolution_angstrom[10] == pytest.approx(9.6)
    assert curve.resolution_inv_angstrom[10] == pytest.approx(10 / 96.0)
    assert curve.resolution() == pytest.approx(9.6)
    path = curve.to_csv(tmp_path / "fsc.csv")
    with open(path) as fh:  # the version and command lines start with "#"
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert list(rows[0]) == ["spectral_index", "resolution_inv_angstrom", "resolution_angstrom", "fsc"]
    assert len(rows) == 33
    assert float(rows[12]["fsc"]) == pytest.approx(0.3)
    assert float(rows[0]["resolution_angstrom"]) == 999.0
    with pytest.raises(OutputError, match="exists"):
        curve.to_csv(path)
    curve.to_csv(path, overwrite=True)
    write_fsc_csv(tmp_path / "two.csv", {"a": hand_curve(), "b": np.ones(33)}, 64, 1.5)
    with open(tmp_path / "two.csv") as fh:
        assert next(csv.reader(line for line in fh if not line.startswith("#")))[-2:] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.csv", "two.csv"]  # no temporary files left


# ----------------------------------------------------------------------------------------------
# Phase randomisation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [24, 25])
def test_randomize_phases_keeps_amplitudes_and_low_shells(rng, n):
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    shell = 5
    r = randomize_phases_beyond(a, shell, seed=3)
    assert r.dtype == np.float32 and r.shape == a.shape
    fa, fr = np.fft.rfftn(a.astype(np.float64)), np.fft.rfftn(r.astype(np.float64))
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    scale = np.abs(fa).max()
    # every amplitude is kept (the map is real, so the transform of the output reproduces them)
    np.testing.assert_allclose(np.abs(fr), np.abs(fa), atol=2e-5 * scale)
    low = r2 < shell * shell
    np.testing.assert_allclose(fr[low], fa[low], atol=2e-5 * scale)
    # the phases beyond are new: their cosine difference averages to about 0
    high = r2 >= shell * shell
    dphi = np.angle(fr[high]) - np.angle(fa[high])
    assert abs(np.cos(dphi).mean()) < 0.05
    # and the FSC with the original vanishes beyond the randomised shell
    curve = fsc(a, r)
    np.testing.assert_allclose(curve[: shell - 1], 1.0, atol=1e-5)
    assert abs(curve[shell + 1:].mean()) < 0.05


def test_randomize_phases_seeding(rng):
    a = rng.standard_normal((16, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(randomize_phases_beyond(a, 3, seed=7), randomize_phases_beyond(a, 3, seed=7))
    assert not np.allclose(randomize_phases_beyond(a, 3, seed=7), randomize_phases_beyond(a, 3, seed=8))
    gen = np.random.default_rng(1)
    first, second = randomize_phases_beyond(a, 3, gen), randomize_phases_beyond(a, 3, gen)
    assert not np.allclose(first, second)  # one generator: independent phases for each map
    with pytest.raises(InputError, match="at least 1"):
        randomize_phases_beyond(a, 0)


def test_plot_fsc_writes_png(tmp_path):
    path = plot_fsc({"unmasked": hand_curve(), "masked": np.linspace(1, 0, 33)}, 64, 1.5, tmp_path / "fsc.png",
                    resolution=9.6, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["fsc.png"]
    with pytest.raises(InputError, match="shells"):
        plot_fsc({"short": np.ones(10)}, 64, 1.5, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
