import json

import numpy as np
import pytest

from numba_recon.checkpoint import Checkpoint, load_checkpoint, load_latest, save_checkpoint
from numba_recon.errors import InputFileError


def _ckpt(epoch, rng):
    vol = rng.standard_normal((2, 6, 6, 6)).astype(np.float32)
    return Checkpoint(epoch=epoch, step=epoch * 10, volumes=vol, adam_m=vol * 0.1, adam_v=vol**2, adam_t=epoch * 10,
                      arrays={"half_set": np.array([1, 2, 1], np.int8)}, config={"seed": 3},
                      state={"lr": [0.1, 0.2]})


def test_round_trip(tmp_path, rng):
    c = _ckpt(3, rng)
    path = save_checkpoint(tmp_path, c)
    back = load_checkpoint(path)
    assert back.epoch == 3 and back.step == 30 and back.adam_t == 30
    np.testing.assert_array_equal(back.volumes, c.volumes)
    np.testing.assert_array_equal(back.arrays["half_set"], c.arrays["half_set"])
    assert back.config == {"seed": 3} and back.state == {"lr": [0.1, 0.2]}
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["epoch"] == 3
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_keeps_last_two(tmp_path, rng):
    for e in (1, 2, 3):
        save_checkpoint(tmp_path, _ckpt(e, rng))
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt_*.h5"))
    assert names == ["ckpt_e0002.h5", "ckpt_e0003.h5"]


def test_corrupt_latest_falls_back(tmp_path, rng, caplog):
    save_checkpoint(tmp_path, _ckpt(1, rng))
    newest = save_checkpoint(tmp_path, _ckpt(2, rng))
    raw = bytearray(newest.read_bytes())
    # flip bytes in the middle of the data: either HDF5 fails or the CRC does
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with pytest.raises(InputFileError):
        load_checkpoint(newest)
    back = load_latest(tmp_path)
    assert back is not None and back.epoch == 1
    assert "skipping damaged checkpoint" in caplog.text


def test_truncated_checkpoint_and_missing_latest(tmp_path, rng):
    save_checkpoint(tmp_path, _ckpt(1, rng))
    newest = save_checkpoint(tmp_path, _ckpt(2, rng))
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "checkpoints" / "latest.json").unlink()
    back = load_latest(tmp_path)
    assert back.epoch == 1


def test_no_checkpoint(tmp_path):
    assert load_latest(tmp_path) is None
