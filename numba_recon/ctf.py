"""The RELION contrast transfer function (``src/ctf.h`` ``getCTF``), positive at low frequency.

``CTF(k) = scale * -sin(gamma(k)) * exp(-B |k|^2 / 4)`` with
``gamma = pi*lambda*(Axx X^2 + 2 Axy X Y + Ayy Y^2) + (pi/2) Cs lambda^3 |k|^4 - phase_shift - atan(Q0/sqrt(1-Q0^2))``
and ``[Axx Axy; Axy Ayy] = Q^T diag(-dU, -dV) Q``, ``Q`` the rotation by the astigmatism angle
(measured from +x toward +y). Frequencies ``X`` (column) and ``Y`` (row) are in 1/Angstrom.
"""

from __future__ import annotations

import numpy as np


def wavelength_angstrom(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom (RELION's constants)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_value(
    kx_inv_angstrom,
    ky_inv_angstrom,
    *,
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_deg,
    voltage_kv,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    bfactor_angstrom2=0.0,
    scale=1.0,
) -> np.ndarray:
    """Evaluate the RELION CTF at spatial frequencies ``(kx, ky)`` in 1/Angstrom.

    All arguments broadcast against each other (numpy rules), so per-particle parameters of shape
    ``(n, 1, 1)`` against a frequency grid of shape ``(N, M)`` give ``(n, N, M)``.
    """
    X = np.asarray(kx_inv_angstrom, dtype=np.float64)
    Y = np.asarray(ky_inv_angstrom, dtype=np.float64)
    lam = wavelength_angstrom(voltage_kv)
    cs_angstrom = np.asarray(cs_mm, dtype=np.float64) * 1e7
    q0 = np.asarray(amplitude_contrast, dtype=np.float64)
    k1 = np.pi * lam
    k2 = np.pi / 2.0 * cs_angstrom * lam**3
    k3 = np.arctan(q0 / np.sqrt(1.0 - q0 * q0))
    k4 = -np.asarray(bfactor_angstrom2, dtype=np.float64) / 4.0
    k5 = np.deg2rad(phase_shift_deg)
    a = np.deg2rad(defocus_angle_deg)
    ca, sa = np.cos(a), np.sin(a)
    du = -np.asarray(defocus_u_angstrom, dtype=np.float64)
    dv = -np.asarray(defocus_v_angstrom, dtype=np.float64)
    # Q^T diag(du, dv) Q with Q = [[c, s], [-s, c]]
    axx = du * ca * ca + dv * sa * sa
    axy = (du - dv) * ca * sa
    ayy = du * sa * sa + dv * ca * ca
    u2 = X * X + Y * Y
    gamma = k1 * (axx * X * X + 2.0 * axy * X * Y + ayy * Y * Y) + k2 * u2 * u2 - k5 - k3
    return np.asarray(scale, dtype=np.float64) * -np.sin(gamma) * np.exp(k4 * u2)


def frequency_grid(box_size: int, pixel_size_angstrom: float, *, half: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies ``(kx, ky)`` in 1/Angstrom on numpy's FFT grid of an ``N x N`` image.

    ``half=True`` gives the ``rfft2`` layout ``(N, N//2 + 1)``; ``half=False`` the full ``fft2``
    layout ``(N, N)``. Rows are ``fftfreq`` (y), columns ``rfftfreq``/``fftfreq`` (x).
    """
    n = int(box_size)
    ky = np.fft.fftfreq(n) / pixel_size_angstrom
    kx = (np.fft.rfftfreq(n) if half else np.fft.fftfreq(n)) / pixel_size_angstrom
    return np.meshgrid(kx, ky, indexing="xy")


def ctf_images(params: dict, box_size: int, pixel_size_angstrom: float, *, half: bool = True,
               dtype=np.float32) -> np.ndarray:
    """CTF of ``n`` particles on the FFT grid.

    Parameters
    ----------
    params
        Mapping with arrays of shape ``(n,)``: ``defocus_u_angstrom``, ``defocus_v_angstrom``,
        ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``, ``amplitude_contrast``,
        ``phase_shift_deg``, ``bfactor_angstrom2``, ``scale``.
    box_size, pixel_size_angstrom
        Image size ``N`` and pixel size.
    half
        ``rfft2`` layout ``(n, N, N//2+1)`` if True, else ``(n, N, N)``.
    """
    kx, ky = frequency_grid(box_size, pixel_size_angstrom, half=half)
    p = {k: np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for k, v in params.items()}
    c = ctf_value(
        kx[None], ky[None],
        defocus_u_angstrom=p["defocus_u_angstrom"],
        defocus_v_angstrom=p["defocus_v_angstrom"],
        defocus_angle_deg=p["defocus_angle_deg"],
        voltage_kv=p["voltage_kv"],
        cs_mm=p["cs_mm"],
        amplitude_contrast=p["amplitude_contrast"],
        phase_shift_deg=p.get("phase_shift_deg", 0.0),
        bfactor_angstrom2=p.get("bfactor_angstrom2", 0.0),
        scale=p.get("scale", 1.0),
    )
    return np.ascontiguousarray(c, dtype=dtype)
