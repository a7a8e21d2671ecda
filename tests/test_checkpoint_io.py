"""Checkpoint reading/writing: safety of pickles, atomic writes, nested state dicts."""
from __future__ import annotations

import os

import pytest
import torch

from ldm.checkpoint import (UnsafeCheckpointError, atomic_write, ema_key, read_state_dict, save_safetensors,
                            split_ignored)


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_nested_state_dict_unwrapped(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a.b": torch.arange(3.0)}, "global_step": 7}, path)
    sd, meta = read_state_dict(path)
    assert list(sd) == ["a.b"] and meta == {}


def test_safetensors_round_trip_with_metadata(tmp_path):
    w = torch.randn(4, 4)
    sd = {"x": w, "y": w}  # shared storage must be accepted
    path = save_safetensors(sd, tmp_path / "m.safetensors", {"k": "v"})
    sd2, meta = read_state_dict(path)
    assert torch.equal(sd2["x"], w) and torch.equal(sd2["y"], w) and meta["k"] == "v"


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "last.safetensors"

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_gives_the_umask_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o027)
    try:
        path = save_safetensors({"x": torch.zeros(2)}, tmp_path / "m.safetensors")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640  # not mkstemp's 0o600


def test_missing_and_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="bad.safetensors"):
        read_state_dict(bad)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="suffix"):
        read_state_dict(odd)


def test_ignored_keys_and_ema_names():
    sd = {"betas": torch.zeros(1), "loss.logvar": torch.zeros(1), "model_ema.decay": torch.zeros(1),
          "model.diffusion_model.out.0.weight": torch.zeros(1)}
    keep, extra = split_ignored(sd)
    assert list(keep) == ["model.diffusion_model.out.0.weight"] and len(extra) == 3
    assert ema_key("diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
