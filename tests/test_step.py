import numpy as np

from numba_recon.step import AdamState, adam_step


def _reference_adam(x, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba's Algorithm 1 in float64, with the second moment one number per half map."""
    m = np.zeros_like(x, dtype=np.float64)
    v = np.zeros((len(x),) + (1,) * (x.ndim - 1))
    x = x.astype(np.float64).copy()
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g.astype(np.float64) ** 2).reshape(len(g), -1).mean(axis=1).reshape(v.shape)
        mh = m / (1 - b1**t)
        vh = v / (1 - b2**t)
        x -= lr * mh / (np.sqrt(vh) + eps)
    return x


def test_adam_matches_reference(rng):
    x0 = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    grads = [rng.standard_normal(x0.shape).astype(np.float32) for _ in range(3)]
    x = x0.copy()
    state = AdamState.zeros(x.shape)
    for g in grads:
        adam_step(x, g, state, 0.01)
    ref = _reference_adam(x0, grads, 0.01)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6)
    assert state.t == 3


def test_adam_step_is_linear_in_the_gradient(rng):
    """The first step is -lr g / rms(g) per half: no per-voxel divisor, so a band-limited gradient
    gives a band-limited step (a per-voxel sqrt(v) would give sign(g), with content at every
    frequency, the same in both halves wherever the gradients agree)."""
    n = 16
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    low = np.sqrt(kx**2 + ky**2 + kz**2) < 0.1
    g = np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal((n, n, n))) * low))
    grad = np.stack([g, 3 * g]).astype(np.float32)
    x = np.zeros_like(grad)
    state = AdamState.zeros(x.shape)
    assert state.v.shape == (2,)
    adam_step(x, grad, state, 0.1)
    rms = np.sqrt((g.astype(np.float64) ** 2).mean())
    np.testing.assert_allclose(x[0], -0.1 * g / rms, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(x[1], x[0], rtol=1e-4, atol=1e-6)  # scale-free, like Adam
    outside = np.abs(np.fft.fftn(x[0]))[~low].max() / np.abs(np.fft.fftn(x[0])).max()
    assert outside < 1e-5


def test_adam_per_half_learning_rate(rng):
    x = np.zeros((2, 3, 3, 3), np.float32)
    g = np.ones_like(x)
    state = AdamState.zeros(x.shape)
    adam_step(x, g, state, np.array([0.1, 0.01]))
    np.testing.assert_allclose(x[0], -0.1, rtol=1e-5)
    np.testing.assert_allclose(x[1], -0.01, rtol=1e-5)


def test_adam_minimises_quadratic():
    x = np.full((1, 2, 2, 2), 5.0, np.float32)
    state = AdamState.zeros(x.shape)
    for _ in range(2000):
        adam_step(x, 2 * x, state, 0.05)
    assert np.abs(x).max() < 1e-2
