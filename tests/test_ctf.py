"""The RELION CTF, asserted with the published test values (sign: positive at low frequency)."""

import numpy as np
import pytest

from numba_recon.ctf import ctf_images, ctf_value, frequency_grid, wavelength_angstrom

BASE = dict(defocus_u_angstrom=15000.0, defocus_v_angstrom=15000.0, defocus_angle_deg=0.0, voltage_kv=300.0,
            cs_mm=2.7, amplitude_contrast=0.1)


def test_wavelength():
    assert abs(wavelength_angstrom(300) - 0.0196876153) < 1e-10
    assert abs(wavelength_angstrom(200) - 0.0250794936) < 1e-10


@pytest.mark.parametrize("k,value", [(0.1, 0.0793210399), (0.01, 0.19174506), (0.02, 0.45397228),
                                     (0.05, 0.66242815), (0.2, -0.84495916), (0.25, 0.26874705), (0.0, 0.1)])
def test_relion_values(k, value):
    assert abs(ctf_value(k, 0.0, **BASE) - value) < 1e-6


def test_astigmatic_and_phase_plate():
    astig = dict(BASE, defocus_u_angstrom=20000.0, defocus_angle_deg=30.0)
    assert abs(ctf_value(0.05, 0.05, **astig) - (-0.1094224887)) < 1e-8
    pp = dict(BASE, phase_shift_deg=90.0, bfactor_angstrom2=100.0)
    assert abs(ctf_value(0.1, 0.0, **pp) - (-0.7763468770)) < 1e-8


def test_astigmatism_angle_direction():
    # defocus U lies along the astigmatism angle, measured from +x toward +y
    astig = dict(BASE, defocus_u_angstrom=20000.0, defocus_v_angstrom=10000.0, defocus_angle_deg=90.0)
    along_y = ctf_value(0.0, 0.03, **astig)
    pure_u = ctf_value(0.03, 0.0, **dict(BASE, defocus_u_angstrom=20000.0, defocus_v_angstrom=20000.0))
    assert abs(along_y - pure_u) < 1e-12


def test_scale_and_grid_layout():
    params = {k: np.array([v, v]) for k, v in BASE.items()}
    params.update(phase_shift_deg=np.zeros(2), bfactor_angstrom2=np.zeros(2), scale=np.array([1.0, 0.5]))
    half = ctf_images(params, 16, 2.0, half=True)
    full = ctf_images(params, 16, 2.0, half=False)
    assert half.shape == (2, 16, 9) and full.shape == (2, 16, 16)
    np.testing.assert_allclose(full[:, :, :9], half, atol=1e-7)
    np.testing.assert_allclose(half[1], 0.5 * half[0], atol=1e-7)
    assert abs(half[0, 0, 0] - 0.1) < 1e-7  # DC = +Q0
    kx, ky = frequency_grid(16, 2.0, half=False)
    assert kx[0, 1] == pytest.approx(1 / 32) and ky[1, 0] == pytest.approx(1 / 32)
    # the CTF is even: H(-k) = H(k), so filtering keeps real images real
    np.testing.assert_allclose(full[0], np.roll(full[0][::-1, ::-1], (1, 1), axis=(0, 1)), atol=1e-6)
