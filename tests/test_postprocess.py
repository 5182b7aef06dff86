"""Filters (low-pass, B-factor, Guinier, FSC weighting) and relion_postprocess on simulated half maps."""

import numpy as np
import pytest

from numba_recon.errors import InputError, OutputError
from numba_recon.evaluate.filters import (apply_bfactor, fit_bfactor, fsc_weight, fsc_weighting_factors, guinier,
                                          lowpass)
from numba_recon.evaluate.fsc import fsc, resolution_at
from numba_recon.evaluate.mask import create_mask
from numba_recon.evaluate.postprocess import postprocess, write_postprocess


def delta(n):
    """A map whose (unnormalised) Fourier transform is 1 everywhere: filters show up unchanged."""
    v = np.zeros((n, n, n), np.float32)
    v[0, 0, 0] = 1.0
    return v


def transfer(out):
    return np.fft.rfftn(out.astype(np.float64)).real


def white_map(n, rng, count=3000):
    """Many single-voxel points: a flat ('white') spectrum, so B = 0 by construction."""
    v = np.zeros((n, n, n), np.float32)
    idx = rng.integers(n // 8, n - n // 8, size=(count, 3))
    np.add.at(v, (idx[:, 0], idx[:, 1], idx[:, 2]), rng.uniform(0.5, 1.5, count).astype(np.float32))
    return v


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------

def test_lowpass_raised_cosine_edge_values():
    n = 64
    f = transfer(lowpass(delta(n), 8.0, 1.0))  # ires = 8: edge from shell 7 to shell 9
    assert f[0, 0, 7] == pytest.approx(1.0, abs=1e-6)
    assert f[0, 0, 8] == pytest.approx(0.5, abs=1e-6)
    assert f[0, 0, 9] == pytest.approx(0.0, abs=1e-6)
    assert f[0, 0, 20] == pytest.approx(0.0, abs=1e-6)
    r = np.sqrt(61.0)  # k = (0, 5, 6)
    assert f[0, 5, 6] == pytest.approx(0.5 + 0.5 * np.cos(np.pi * (r / 64 - 7 / 64) / (2 / 64)), abs=1e-6)
    assert f[0, -5, 6] == pytest.approx(f[0, 5, 6], abs=1e-6)
    # RELION's ROUND takes halves away from zero: 64 / 7.5294 = 8.5 -> shell 9 (np.round would give 8)
    g = transfer(lowpass(delta(n), 64 / 8.5, 1.0))
    assert g[0, 0, 9] == pytest.approx(0.5, abs=1e-6)
    # edge width 0 (and 1, integer half width 0): a hard cut at the shell
    h = transfer(lowpass(delta(n), 8.0, 1.0, edge_width_shells=0))
    assert h[0, 0, 8] == pytest.approx(1.0, abs=1e-6) and h[0, 0, 9] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError, match="positive"):
        lowpass(delta(16), -3.0, 1.0)


def test_apply_bfactor_factor_and_nyquist_cut():
    n = 64
    f = transfer(apply_bfactor(delta(n), 100.0, 1.5))
    s = 10 / (64 * 1.5)
    assert f[0, 0, 10] == pytest.approx(np.exp(-25.0 * s * s), rel=1e-5)
    assert f[0, 0, 32] == pytest.approx(np.exp(-25.0 / 9.0), rel=1e-5)  # Nyquist, s = 1/3 A^-1
    assert f[0, 20, 30] == pytest.approx(0.0, abs=1e-6)  # |k|^2 = 1300 > 32^2: beyond Nyquist
    sharp = transfer(apply_bfactor(delta(n), -50.0, 1.5))
    assert sharp[0, 0, 10] == pytest.approx(np.exp(12.5 * s * s), rel=1e-5)


def test_guinier_normalisation_and_bfactor_recovery(rng):
    n = 64
    s2, ln = guinier(delta(n), 1.0)
    np.testing.assert_allclose(ln, np.log(1.0 / n ** 3), atol=1e-5)  # RELION: FFT divided by N^3
    np.testing.assert_allclose(s2[[1, 32]], [(1 / 64) ** 2, 0.25])
    white = white_map(n, rng)
    b0, _, _ = fit_bfactor(white, 1.0)
    assert abs(b0) < 5.0
    blurred = apply_bfactor(white, 100.0, 1.0)
    b, intercept, corr = fit_bfactor(blurred, 1.0, 10.0, None)
    assert b == pytest.approx(-100.0, rel=0.10)  # the B that sharpens it back
    assert corr > 0.98
    assert fit_bfactor(blurred, 1.0, 10.0, 3.0)[0] == pytest.approx(-100.0, rel=0.10)
    restored = apply_bfactor(blurred, b, 1.0)
    assert abs(fit_bfactor(restored, 1.0)[0]) < 10.0
    with pytest.raises(InputError, match="at least 2"):
        fit_bfactor(blurred, 1.0, 10.0, 9.5)


def test_fsc_weighting_zero_from_first_tiny_shell():
    f = np.zeros(33)
    f[:6] = [1.0, 0.9, 0.5, 0.2, 0.00005, 0.3]  # drops below 1e-4 at shell 4, rebounds at 5
    w = fsc_weighting_factors(f)
    np.testing.assert_allclose(w[:4], np.sqrt(2 * f[:4] / (1 + f[:4])))
    assert np.all(w[4:] == 0)
    t = transfer(fsc_weight(delta(64), f))
    assert t[0, 0, 2] == pytest.approx(np.sqrt(1.0 / 1.5), abs=1e-6)
    assert abs(t[0, 0, 5]) < 1e-6 and abs(t[0, 20, 30]) < 1e-6
    with pytest.raises(InputError, match="shells"):
        fsc_weight(delta(64), np.ones(10))


# ----------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def particle(blobs):
    gen = np.random.default_rng(7)
    truth = blobs(64, 60, 1.2, 14, gen)
    mask = create_mask(lowpass(truth, 10.0, 1.0), 0.02 * float(truth.max()), 4, 8)
    return truth, mask


def test_corrected_fsc_matches_half_map_fsc_against_truth(particle):
    """With half maps h_k = t + n_k (independent noise) the FSC between half maps estimates
    S / (S + N), and the FSC of one masked half map against the masked truth estimates
    sqrt(S / (S + N)). So FSC(M h1, M t) * FSC(M h2, M t) is the half-map FSC implied by the truth
    inside the mask; the corrected FSC must match it. (2 F / (1 + F) relates the half-map FSC to
    the FSC of the *averaged* map, not of one half.) Averaged over 12 noise draws so that the
    comparison is not limited by the scatter of one draw."""
    truth, mask = particle
    gen = np.random.default_rng(11)
    corrected, reference, unmasked = [], [], []
    for k in range(12):
        h1 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
        h2 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
        res = postprocess(h1, h2, 1.0, mask=mask, seed=k)
        corrected.append(res.fsc_corrected)
        unmasked.append(res.fsc_unmasked)
        reference.append(fsc(h1 * mask, truth * mask) * fsc(h2 * mask, truth * mask))
    corrected, reference, unmasked = (np.mean(x, axis=0) for x in (corrected, reference, unmasked))
    shell = round(64 / resolution_at(corrected, 64, 1.0))
    assert shell > 10
    assert np.max(np.abs(corrected - reference)[1:shell + 1]) < 0.05
    # the comparison is sensitive: the unmasked FSC (noise of the whole box) is far off
    assert np.max(np.abs(unmasked - reference)[1:shell + 1]) > 0.2


def test_phase_randomisation_removes_mask_correlation(blobs):
    """A band-limited particle (no signal beyond shell 8) in a tight binary mask: the mask edge puts
    the same high-frequency content into both masked half maps (masked FSC stays high); the
    phase-randomised correction brings the FSC back to about 0 from randomize_at + 2."""
    gen = np.random.default_rng(3)
    band = lowpass(blobs(64, 60, 1.2, 14, gen), 8.0, 1.0, edge_width_shells=0)
    h1 = band + 0.02 * gen.standard_normal(band.shape).astype(np.float32)
    h2 = band + 0.02 * gen.standard_normal(band.shape).astype(np.float32)
    mask = create_mask(band, 0.3 * float(band.max()))
    res = postprocess(h1, h2, 1.0, mask=mask)
    start = res.randomize_at_shell + 2
    assert res.randomize_at_shell == 9  # first shell > 0 with unmasked FSC < 0.8
    assert res.fsc_masked[start:].mean() > 0.8
    assert abs(res.fsc_corrected[start:].mean()) < 0.1  # (seed-to-seed scatter about 0.03)
    assert res.resolution_shell <= start - 1
    assert any("phase-randomised FSC" in w for w in res.warnings)


def test_postprocess_follows_relion_formulas(particle):
    truth, mask = particle
    gen = np.random.default_rng(5)
    h1 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    h2 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    res = postprocess(h1, h2, 1.0, mask=mask, seed=2)
    np.testing.assert_allclose(res.fsc_unmasked, fsc(h1, h2), atol=1e-6)
    np.testing.assert_allclose(res.fsc_masked[1:], fsc(h1, h2, mask)[1:], atol=1e-6)
    r = res.randomize_at_shell
    assert r == 1 + int(np.flatnonzero(res.fsc_unmasked[1:] < 0.8)[0])
    np.testing.assert_allclose(res.fsc_corrected[: r + 2], res.fsc_masked[: r + 2])
    m, p = res.fsc_masked[r + 2:], res.fsc_random_masked[r + 2:]
    np.testing.assert_allclose(res.fsc_corrected[r + 2:], (m - p) / (1 - p))
    assert res.resolution_angstrom == pytest.approx(resolution_at(res.fsc_corrected, 64, 1.0))
    assert res.lowpass_angstrom == res.resolution_angstrom
    # the final map holds nothing beyond the low-pass edge (one shell past the resolution shell)
    f = np.abs(np.fft.rfftn(res.map.astype(np.float64)))
    k = np.fft.fftfreq(64, 1 / 64)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(33)[None, None, :] ** 2
    assert f[r2 > (res.resolution_shell + 1) ** 2].max() < 1e-6 * f.max()
    np.testing.assert_allclose(res.map_masked, res.map * mask, atol=1e-6)
    # same seed, same answer
    again = postprocess(h1, h2, 1.0, mask=mask, seed=2)
    np.testing.assert_array_equal(again.fsc_random_masked, res.fsc_random_masked)


def test_postprocess_without_mask_and_given_values(particle):
    truth, _ = particle
    gen = np.random.default_rng(9)
    h1 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    h2 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    res = postprocess(h1, h2, 1.0, bfactor=-40.0, lowpass_angstrom=6.0)
    assert res.fsc_masked is None and res.map_masked is None and res.randomize_at_shell is None
    np.testing.assert_array_equal(res.fsc_corrected, res.fsc_unmasked)
    assert res.bfactor_angstrom2 == -40.0 and not res.bfactor_fitted and res.guinier_slope is None
    assert res.lowpass_angstrom == 6.0
    assert postprocess(h1, h2, 1.0, bfactor=50.0).warnings  # a positive B blurs: warned


def test_postprocess_recovers_bfactor():
    gen = np.random.default_rng(4)
    blurred = apply_bfactor(white_map(64, gen), 100.0, 1.0)
    h1 = blurred + 1e-3 * gen.standard_normal(blurred.shape).astype(np.float32)
    h2 = blurred + 1e-3 * gen.standard_normal(blurred.shape).astype(np.float32)
    res = postprocess(h1, h2, 1.0)
    assert res.bfactor_fitted
    assert res.bfactor_angstrom2 == pytest.approx(-100.0, rel=0.10)
    assert res.bfactor_angstrom2 == pytest.approx(4 * res.guinier_slope)
    # the sharpened Guinier plot is flat over the fitted range
    used = res.guinier_fit_shells
    slope = np.polyfit(res.guinier_s2[used], res.guinier_ln_sharpened[used], 1)[0]
    assert abs(4 * slope) < 10.0


def test_postprocess_unmasked_fallback_and_errors(particle):
    truth, mask = particle
    gen = np.random.default_rng(6)
    h1 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    h2 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    solvent_only = (1.0 - mask).astype(np.float32)  # masks out the particle: only noise is left
    res = postprocess(h1, h2, 1.0, mask=solvent_only)
    assert res.unmasked_fallback and not res.mask_used
    np.testing.assert_array_equal(res.fsc_corrected, res.fsc_unmasked)
    assert res.resolution_angstrom == pytest.approx(resolution_at(res.fsc_unmasked, 64, 1.0))
    assert any("unmasked FSC extends beyond" in w for w in res.warnings)
    forced = postprocess(h1, h2, 1.0, mask=solvent_only, force_mask=True)
    assert not forced.unmasked_fallback and forced.resolution_shell < res.resolution_shell
    with pytest.raises(InputError, match="never drops below 0.8"):
        postprocess(truth, truth, 1.0, mask=mask)
    with pytest.raises(InputError, match="different boxes"):
        postprocess(h1, h2[:32, :32, :32], 1.0)
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        postprocess(h1, h2, 1.0, mask=2 * mask)
    with pytest.raises(InputError, match="pixel size"):
        postprocess(h1, h2, 0.0)


def test_write_postprocess_outputs(particle, tmp_path):
    import starfile

    from numba_recon.io.mrc import read_volume

    truth, mask = particle
    gen = np.random.default_rng(8)
    h1 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    h2 = truth + 0.25 * gen.standard_normal(truth.shape).astype(np.float32)
    res = postprocess(h1, h2, 1.25, mask=mask)
    out = tmp_path / "post"
    files = write_postprocess(res, out, "h1.mrc", "h2.mrc", "mask.mrc")
    assert sorted(p.name for p in out.iterdir()) == sorted(files) == sorted(
        ["postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.csv",
         "postprocess_fsc.png", "postprocess_guinier.png"])
    vol, angpix = read_volume(out / "postprocess.mrc")
    assert angpix == pytest.approx(1.25) and np.allclose(vol, res.map)
    star = starfile.read(out / "postprocess.star", always_dict=True)
    assert list(star) == ["general", "fsc", "guinier"]
    general = star["general"]
    assert float(general["rlnFinalResolution"]) == pytest.approx(res.resolution_angstrom, rel=1e-5)
    assert float(general["rlnBfactorUsedForSharpening"]) == pytest.approx(res.bfactor_angstrom2, rel=1e-5)
    assert general["rlnUnfilteredMapHalf1"] == "h1.mrc" and general["rlnMaskName"] == "mask.mrc"
    assert float(general["rlnRandomiseFrom"]) == pytest.approx(64 * 1.25 / res.randomize_at_shell, rel=1e-5)
    assert float(general["rlnFittedSlopeGuinierPlot"]) == pytest.approx(res.guinier_slope, rel=1e-5)
    table = star["fsc"]
    assert list(table.columns) == ["rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution",
                                   "rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelationUnmaskedMaps",
                                   "rlnFourierShellCorrelationMaskedMaps",
                                   "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]
    assert table["rlnAngstromResolution"].iloc[0] == 999.0 and len(table) == 33
    np.testing.assert_allclose(table["rlnFourierShellCorrelationCorrected"], res.fsc_corrected, atol=1e-6)
    assert {"rlnResolutionSquared", "rlnLogAmplitudesOriginal", "rlnLogAmplitudesWeighted",
            "rlnLogAmplitudesSharpened", "rlnLogAmplitudesIntercept"} <= set(star["guinier"].columns)
    before = (out / "postprocess.star").read_bytes()
    with pytest.raises(OutputError, match="exist"):
        write_postprocess(res, out, "a.mrc", "b.mrc", "mask.mrc")
    assert (out / "postprocess.star").read_bytes() == before
    write_postprocess(res, out, "a.mrc", "b.mrc", "mask.mrc", overwrite=True)
    assert b"a.mrc" in (out / "postprocess.star").read_bytes()
    assert len(list(out.iterdir())) == 6  # no temporary files left behind
