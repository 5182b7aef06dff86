"""The adam step on the device: the backend's ``scale_gradient``/``adam_update``, what a step
copies to the host on the CUDA backend (Numba's simulator), and CPU maps unchanged bit for bit.

The counts come from a subprocess that wraps the simulator's device-to-host copy and its device
allocations, and marks each step (``adam_update``) and each epoch. A step of the plain L2 loss
copies nothing to the host and allocates nothing; a step of a robust loss copies only the
shard's per-particle losses and energies; the maps and moments leave the device between the last
step of an epoch and its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from numba_recon.config import RunConfig
from numba_recon.recon.engine import Reconstruction
from numba_recon.recon.state import EpochStats
from numba_recon.step import AdamState, adam_step

BOX = 8
N_PARTICLES = 24
BATCH = 8


def _simulate(path: Path, n: int, box: int, junk: float = 0.0) -> Path:
    from numba_recon.sim.simulate import simulate_dataset

    simulate_dataset(path, n_particles=n, box_size=box, pixel_size_angstrom=6.0, snr=0.5, defocus_min_um=1.0,
                     defocus_max_um=2.5, astigmatism_angstrom=200.0, voltage_kv=300.0, cs_mm=2.7,
                     amplitude_contrast=0.1, max_shift_px=1.0, junk_fraction=junk, junk_kinds=("noise",),
                     volume_path=None, seed=3, particles_per_stack=250, overwrite=True)
    return path / "particles.star"


# ------------------------------------------------------------------------------------------
# the backend functions


def _reference_step(params, grad, m, v, lr, t, scale, ridge):
    """The host step the engine took before: scale, ridge, then step.adam_step."""
    g = grad.copy()
    for h in range(len(g)):
        if scale[h] != 0:
            g[h] *= np.float32(scale[h])
            g[h] += np.float32(ridge[h]) * params[h]
        else:
            g[h] = 0.0
    state = AdamState(m, v, t - 1)
    adam_step(params, g, state, lr)
    return g


def test_adam_update_is_the_host_step(backend):
    be = backend
    rng = np.random.default_rng(7)
    shape = (2, 5, 6, 7)
    params = rng.standard_normal(shape).astype(np.float32)
    m = np.zeros(shape, np.float32)
    v = np.zeros(shape[:1], np.float32)  # one second moment per half
    dev = [be.copy_into(be.zeros(a.shape), a) for a in (params, m, v)]
    grad_dev = be.zeros(shape)
    for t, scale in enumerate(([1.5, 0.25], [3.0, 0.0], [0.5, 2.0]), start=1):
        grad = rng.standard_normal(shape).astype(np.float32)
        lr = np.array([0.1, 0.02]) * (0.9 ** t)
        scale = np.array(scale, np.float32)
        ridge = np.array([0.01, 0.3], np.float32)
        used = _reference_step(params, grad, m, v, lr, t, scale, ridge)
        be.copy_into(grad_dev, grad)
        be.adam_update(dev[0], grad_dev, dev[1], dev[2], lr, 0.9, 0.999, 1e-8, t, scale, ridge)
        np.testing.assert_array_equal(be.to_host(grad_dev), used)  # the gradient the step used
    for got, want in zip(dev, (params, m, v)):
        if be.name == "cpu":
            np.testing.assert_array_equal(be.to_host(got), want)  # bit for bit
        else:  # a GPU may fuse a multiply and an add; the simulator does not
            np.testing.assert_allclose(be.to_host(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_prescaled_gradient_and_buffer_helpers(backend):
    be = backend
    rng = np.random.default_rng(8)
    shape = (2, 4, 4, 4)
    params = rng.standard_normal(shape).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    p_dev, g_dev = be.copy_into(be.zeros(shape), params), be.copy_into(be.zeros(shape), grad)
    be.scale_gradient(g_dev, p_dev, np.array([2.0, 0.0], np.float32), np.array([0.5, 7.0], np.float32))
    scaled = be.to_host(g_dev)
    np.testing.assert_array_equal(scaled[0], np.float32(2.0) * grad[0] + np.float32(0.5) * params[0])
    assert not scaled[1].any()  # a half without particles: no gradient, not even the ridge's
    # scale None: the gradient is used as it is (the host symmetry / preconditioner path)
    m, v = be.zeros(shape), be.zeros(shape[:1])
    be.adam_update(p_dev, g_dev, m, v, 0.05, 0.9, 0.999, 1e-8, 1, None, None)
    state = AdamState.zeros(shape)
    adam_step(params, scaled.copy(), state, 0.05)
    np.testing.assert_allclose(be.to_host(p_dev), params, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(be.to_host(g_dev), scaled)
    with pytest.raises(ValueError, match="both or neither"):
        be.adam_update(p_dev, g_dev, m, v, 0.05, 0.9, 0.999, 1e-8, 2, np.ones(2), None)
    buf = be.zeros((5, 3))
    be.copy_into(buf[:2], np.arange(6.0).reshape(2, 3))
    assert be.to_host(buf)[:2].tolist() == [[0, 1, 2], [3, 4, 5]] and not be.to_host(buf)[2:].any()
    be.fill(buf, 0.0)
    assert not be.to_host(buf).any()


# ------------------------------------------------------------------------------------------
# copies per step on the CUDA backend (simulator, subprocess)

_SIM_SCRIPT = r"""
import json, sys
import numpy as np
sys.setswitchinterval(5e-4)  # the simulator's threads wait on barriers; see tests/test_cuda_sim.py
from numba import cuda
from numba.cuda.simulator.cudadrv import devicearray
import numba_recon.cuda as nc
from numba_recon.config import RunConfig
from numba_recon.recon.engine import Reconstruction

star, out, events_path, maps_path = sys.argv[1:5]
events = []
copy_to_host = devicearray.FakeCUDAArray.copy_to_host

def counted_copy(self, *args, **kwargs):
    events.append(["d2h", list(self.shape)])
    return copy_to_host(self, *args, **kwargs)

devicearray.FakeCUDAArray.copy_to_host = counted_copy
for name in ("device_array", "to_device"):
    def counted_alloc(*args, _f=getattr(cuda, name), **kwargs):
        events.append(["alloc"])
        return _f(*args, **kwargs)
    setattr(cuda, name, counted_alloc)
adam_update = nc.adam_update

def marked_step(*args, **kwargs):
    events.append(["step"])
    return adam_update(*args, **kwargs)

nc.adam_update = marked_step  # the backend tuple is built from the module when the job starts
run_epoch = Reconstruction._run_epoch

def marked_epoch(self, st, epoch):
    events.append(["epoch", epoch])
    stats = run_epoch(self, st, epoch)
    events.append(["end", epoch])
    return stats

Reconstruction._run_epoch = marked_epoch
config = RunConfig(particles=star, out_dir=out, epochs=2, batch_size=%(batch)d, optimizer="adam", backend="cuda",
                   seed=2, cv_fraction=0.0, loss="reweighted", robust_warmup=1)
job = Reconstruction(config, progress=False)
assert job.backend.name == "cuda"
job.run()
json.dump(events, open(events_path, "w"))
np.save(maps_path, job.state.volumes)
"""

#: epoch 1 is plain L2, epoch 2 the robust (reweighted) loss
_CONFIG = dict(epochs=2, batch_size=BATCH, optimizer="adam", seed=2, cv_fraction=0.0, loss="reweighted",
               robust_warmup=1)


@pytest.fixture(scope="module")
def device_run(tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("device-step")
    star = _simulate(base / "data", N_PARTICLES, BOX)
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    events_path, maps_path = base / "events.json", base / "maps.npy"
    proc = subprocess.run([sys.executable, "-c", _SIM_SCRIPT % {"batch": BATCH}, str(star), str(base / "cuda"),
                           str(events_path), str(maps_path)], env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = json.loads(events_path.read_text())
    epochs = []
    for i, event in enumerate(events):
        if event[0] == "epoch":
            end = events.index(["end", event[1]], i)
            body = events[i + 1:end]
            last_step = max(j for j, e in enumerate(body) if e[0] == "step")
            epochs.append({"steps": body[:last_step + 1], "tail": body[last_step + 1:],
                           "n_steps": sum(e[0] == "step" for e in body)})
    return {"star": star, "base": base, "epochs": epochs, "maps": np.load(maps_path)}


def _volume_copies(events: list) -> list:
    return [e for e in events if e[0] == "d2h" and len(e[1]) >= 3 and e[1][-3:] == [BOX] * 3]


@pytest.mark.slow
def test_a_plain_l2_step_copies_nothing_to_the_host_and_allocates_nothing(device_run):
    epoch = device_run["epochs"][0]
    assert epoch["n_steps"] >= 2
    assert [e for e in epoch["steps"] if e[0] == "d2h"] == []
    assert [e for e in epoch["steps"] if e[0] == "alloc"] == []


@pytest.mark.slow
def test_a_robust_step_copies_only_per_particle_vectors(device_run):
    epoch = device_run["epochs"][1]
    copies = [e for e in epoch["steps"] if e[0] == "d2h"]
    assert copies, "the robust loss needs each shard's scores"
    assert all(len(shape) == 1 and shape[0] <= BATCH for _, shape in copies), copies
    # three per half and step: the shard's losses, model energies and image norms (the particles
    # are prepared on the device; their noise variances wait for the end of the epoch)
    assert len(copies) == 3 * 2 * epoch["n_steps"]
    assert [e for e in epoch["steps"] if e[0] == "alloc"] == []


@pytest.mark.slow
def test_maps_and_moments_leave_the_device_once_per_epoch(device_run):
    for epoch in device_run["epochs"]:
        assert _volume_copies(epoch["steps"]) == []
        # the maps (FSC, divergence check) and, with a checkpoint due every epoch, m and v (2,)
        assert _volume_copies(epoch["tail"]) == [["d2h", [2, BOX, BOX, BOX]]] * 2
        assert ["d2h", [2]] in epoch["tail"]
        losses = [e for e in epoch["tail"] if e[0] == "d2h" and len(e[1]) == 1 and e[1][0] > BATCH]
        # the epoch's losses and energies, and the norms and noise variances the device prepared, once
        assert len(losses) == 4


@pytest.mark.slow
def test_simulator_maps_equal_cpu_maps(device_run, tmp_path):
    config = RunConfig(particles=str(device_run["star"]), out_dir=str(tmp_path / "cpu"), backend="cpu", **_CONFIG)
    job = Reconstruction(config, progress=False)
    job.run()
    cpu, cuda = job.state.volumes, device_run["maps"]
    assert np.isfinite(cuda).all() and np.abs(cpu).max() > 0
    rel = float(np.abs(cuda - cpu).max() / np.abs(cpu).max())
    assert rel < 1e-4, rel


# ------------------------------------------------------------------------------------------
# the CPU maps are those of the host step, bit for bit


def _host_step_epoch(self: Reconstruction, st: Any, epoch: int) -> EpochStats:
    """The adam epoch as it was before the step moved to the backend: gradients copied to the host
    every step, scaled there, ``step.adam_step`` in numpy, the maps copied back."""
    from numba_recon.batch import epoch_batches, shard
    from numba_recon.loss import good_population

    cfg, be, n = self.config, self.backend, self.box
    train = [np.flatnonzero((st.halves == h + 1) & ~st.cv) for h in (0, 1)]
    batches = [epoch_batches(train[h], cfg.batch_size, cfg.seed, epoch, h + 1) for h in (0, 1)]
    n_steps = max(len(batches[0]), len(batches[1]))
    scores_epoch = np.full(len(self.particles), np.nan)
    loss_sum = 0.0
    self._population = {}
    if self.schedule.active(epoch):
        for h in (0, 1):
            prev = st.scores_prev[train[h]]
            prev = prev[np.isfinite(prev)]
            if prev.size:
                self._population[h] = good_population(prev)
    self._volume_dev = [be.to_device(st.volumes[0]), be.to_device(st.volumes[1])]
    for k in range(n_steps):
        grads = be.zeros(st.volumes.shape)
        weight_sums = np.zeros(2)
        for h in (0, 1):
            if k >= len(batches[h]):
                continue
            gb = batches[h][k]
            local = shard(gb, self.comm.rank, self.comm.size)
            prep, rot, resid, losses, scores = self._forward(local, self._volume_dev[h])
            w_local, w_global, _ = self._global_weights(gb, local, scores, h, epoch)
            be.weighted_backproject(resid, rot, be.to_device(np.asarray(w_local, np.float32)), self.radius, grads[h])
            scores_epoch[local] = scores
            loss_sum += float(np.sum(losses / (n * n * prep.noise_var.astype(np.float64))))
            weight_sums[h] = float(np.sum(w_global))
        g = np.array(be.to_host(grads), dtype=np.float32)
        for h in (0, 1):
            if weight_sums[h] > 0:
                n_h = float(train[h].size)
                g[h] *= np.float32(n_h / weight_sums[h])
                g[h] += np.float32(2.0 * n_h * cfg.reg_lambda**2) * st.volumes[h]
            else:
                g[h] = 0.0
        if self._adam_preconditioner is not None:
            for h in (0, 1):
                g[h] = self._adam_preconditioner(g[h], h)
        if len(self.sym_ops) > 1:
            from numba_recon.symmetry.groups import symmetrize_volume

            for h in (0, 1):
                if st.step == 0:
                    st.volumes[h] = symmetrize_volume(st.volumes[h], self.sym_ops)
                g[h] = symmetrize_volume(g[h], self.sym_ops)
        adam_step(st.volumes, g, st.adam, st.lr_abs * self._lr_factor(epoch, k, n_steps))
        st.step += 1
        self._volume_dev = [be.to_device(st.volumes[0]), be.to_device(st.volumes[1])]
    st.scores_prev = scores_epoch
    n_train = sum(t.size for t in train)
    return EpochStats(epoch=epoch + 1, train_loss=loss_sum / max(1, n_train), cv_loss=float("nan"),
                      resolution_angstrom=float("nan"), resolution_05_angstrom=float("nan"), kept_fraction=1.0,
                      seconds=1.0, images_per_second=1.0)


class _HostStep(Reconstruction):
    _run_epoch = _host_step_epoch


@pytest.fixture(scope="module")
def cpu_set(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("cpu-step"), 160, 16, junk=0.1)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {},
    {"loss": "trimmed", "robust_warmup": 1},
    {"symmetry": "C2", "precondition": True, "reg_lambda": 0.05},
], ids=["l2", "trimmed", "C2-precondition"])
def test_cpu_adam_runs_are_those_of_the_host_step(cpu_set, tmp_path, extra):
    runs = {}
    for name, cls in (("device", Reconstruction), ("host", _HostStep)):
        config = RunConfig(particles=str(cpu_set), out_dir=str(tmp_path / name), epochs=3, batch_size=32,
                           optimizer="adam", backend="cpu", seed=4, **extra)
        job = cls(config, progress=False)
        job.run()
        runs[name] = job.state
        if name == "host":  # the reference never touched the backend's moments
            assert not job.backend.to_host(job._device_step.m).any()
    device, host = runs["device"], runs["host"]
    assert device.adam.t == host.adam.t == device.step > 6
    for field in ("volumes", "scores_prev"):
        np.testing.assert_array_equal(_bits(getattr(device, field)), _bits(getattr(host, field)), err_msg=field)
    np.testing.assert_array_equal(_bits(device.adam.m), _bits(host.adam.m))
    np.testing.assert_array_equal(_bits(device.adam.v), _bits(host.adam.v))
    assert [r["train_loss"] for r in device.history] == [r["train_loss"] for r in host.history]
