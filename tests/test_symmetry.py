"""Point-group operators (RELION's generators, conventions.md section 8) and map symmetrisation."""

from __future__ import annotations

import numpy as np
import pytest

from numba_recon.errors import InputError
from numba_recon.sim.phantom import Blobs, proteasome_blobs, render_volume
from numba_recon.symmetry.groups import (axis_angle_matrix, symmetrize_volume, symmetry_generators, symmetry_operators,
                                         symmetry_order)

ORDERS = {"C1": 1, "C2": 2, "C7": 7, "D1": 2, "D2": 4, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}

# conventions.md section 8: (axis as printed there, fold)
TABLE_AXES = {
    "T": [((0, 0, 1), 3), ((0, 0.816496, 0.577350), 2)],
    "O": [((1, 1, 1), 3), ((0, 0, 1), 4)],
    "I2": [((0, 0, 1), 2), ((0.525731, 0, 0.850651), 5), ((0, 0.356822, 0.934172), 3)],
    "I1": [((1, 0, 0), 2), ((0.850651, 0, -0.525731), 5), ((0.934172, 0.356822, 0), 3)],
    "I3": [((0, 0, 1), 5), ((-0.525731, 0, 0.850651), 2)],
    "I4": [((0.525731, 0, 0.850651), 2), ((0.894427, 0, 0.447214), 5)],
}


def _contains(ops: np.ndarray, m: np.ndarray, tol: float = 1e-5) -> bool:
    return bool(np.min(np.abs(ops - m[None]).reshape(len(ops), -1).max(axis=1)) < tol)


@pytest.mark.parametrize("name,order", sorted(ORDERS.items()))
def test_orders_closure_and_proper_rotations(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3)
    np.testing.assert_allclose(ops[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(ops), 1.0, atol=1e-10)
    np.testing.assert_allclose(ops @ np.swapaxes(ops, 1, 2), np.broadcast_to(np.eye(3), ops.shape), atol=1e-10)
    for g in ops:  # closed under products and inverses
        for h in ops:
            assert _contains(ops, g @ h)
        assert _contains(ops, g.T)
    # no duplicates
    flat = ops.reshape(order, 9)
    d = np.abs(flat[:, None] - flat[None]).max(axis=2) + np.eye(order) * 10
    assert d.min() > 1e-3
    assert symmetry_order(name) == order


def test_names_case_insensitive_and_i_is_i2():
    np.testing.assert_array_equal(symmetry_operators("d7"), symmetry_operators("D7"))
    np.testing.assert_array_equal(symmetry_operators(" i "), symmetry_operators("I2"))


def test_d7_operators():
    ops = symmetry_operators("D7")
    assert len(ops) == 14
    assert _contains(ops, np.diag([1.0, -1.0, -1.0]))  # the 2-fold about X (not Y as in ASPIRE)
    assert not _contains(ops, np.diag([-1.0, 1.0, -1.0]))
    c, s = np.cos(2 * np.pi / 7), np.sin(2 * np.pi / 7)
    assert _contains(ops, np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    # every operator maps the Z axis to +-Z
    np.testing.assert_allclose(np.abs(ops[:, 2, 2]), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TABLE_AXES))
def test_generator_axes_match_relion_table(name):
    ops = symmetry_operators(name)
    gens = symmetry_generators(name)
    for (axis, fold), (gen_axis, gen_fold) in zip(TABLE_AXES[name], gens):
        unit = np.asarray(axis, float) / np.linalg.norm(axis)
        np.testing.assert_allclose(gen_axis, unit, atol=1e-6)
        assert gen_fold == fold
        for k in range(1, fold):
            assert _contains(ops, axis_angle_matrix(unit, 2 * np.pi * k / fold)), (name, axis, k)


def test_icosahedral_settings_differ():
    sets = {n: symmetry_operators(n) for n in ("I1", "I2", "I3", "I4")}
    for a in sets:
        for b in sets:
            if a < b:
                assert not all(_contains(sets[b], g) for g in sets[a]), (a, b)


@pytest.mark.parametrize("bad", ["C0", "D0", "X3", "D", "I5", "", "C7.5", "Oh"])
def test_unknown_names_raise_with_valid_list(bad):
    with pytest.raises(InputError) as info:
        symmetry_operators(bad)
    msg = str(info.value)
    for valid in ("C1", "Dn", "T", "O", "I1", "I4"):
        assert valid in msg


def _random_blob_map(rng, n=32, count=12):
    centres = rng.uniform(-6, 6, size=(count, 3))
    return render_volume(Blobs(centres, rng.uniform(2.5, 3.5, count), rng.uniform(0.5, 1.0, count)), n, 1.0)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["C3", "D7", "O"])
def test_symmetrized_map_is_invariant_under_each_operator(name, rng):
    vol = _random_blob_map(rng)
    ops = symmetry_operators(name)
    sym = symmetrize_volume(vol, ops)
    assert sym.shape == vol.shape and sym.dtype == np.float32
    for g in ops[1:]:
        rotated = symmetrize_volume(sym, g[None])  # x(R_g r): one operator only rotates
        assert _rel(rotated, sym) < 0.03
    # the unsymmetrised map is not invariant: the check above can fail
    assert _rel(symmetrize_volume(vol, ops[1:2]), vol) > 0.3


def test_c1_is_identity_and_float64_kept(rng):
    vol = _random_blob_map(rng).astype(np.float64)
    out = symmetrize_volume(vol, symmetry_operators("C1"))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, vol)


def test_d7_phantom_is_a_fixed_point():
    # the phantom's blobs, widened to >= 2 px so trilinear interpolation is accurate at box 48
    pixel = 5.0
    ph = proteasome_blobs(0)
    wide = Blobs(ph.centres_angstrom, np.maximum(ph.sigmas_angstrom, 2.0 * pixel), ph.amplitudes)
    vol = render_volume(wide, 48, pixel)
    assert _rel(symmetrize_volume(vol, symmetry_operators("D7")), vol) < 0.02
    # neither D6 nor the 2-fold about Z is a symmetry of it
    assert _rel(symmetrize_volume(vol, symmetry_operators("D6")), vol) > 0.08
    assert _rel(symmetrize_volume(vol, symmetry_operators("C2")), vol) > 0.08


@pytest.mark.parametrize("name", ["C361", "D1000", "C10001", "C10000000"])
def test_orders_beyond_the_tolerance_are_refused(name):
    """Cn and Dn orders past 360 would not close into a group (a traceback) or collapse to C1 without
    a word: they are refused with the valid range."""
    from numba_recon.errors import InputError

    with pytest.raises(InputError, match="between 1 and 360"):
        symmetry_operators(name)


def test_sym_order_refused_before_any_work(tmp_path):
    from click.testing import CliRunner

    from numba_recon.cli import main

    res = CliRunner().invoke(main, ["run", str(tmp_path / "none.star"), "-o", str(tmp_path / "out"), "--sym",
                                    "C10001"])
    assert res.exit_code == 2 and "between 1 and 360" in res.output
    assert not (tmp_path / "out").exists()
