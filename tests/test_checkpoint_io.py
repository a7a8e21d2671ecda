"""Checkpoint reading/writing: safety of pickles, atomic writes, nested state dicts."""
from __future__ import annotations

import logging
import os
import sys
import types

import numpy as np
import pytest
import torch

import ldm
from ldm.checkpoint import (Inert, UnsafeCheckpointError, atomic_write, ema_key, pickled_tensors, read_state_dict,
                            save_safetensors, split_ignored)
from ldm.diffusion.schedules import ldm_schedule_buffers, make_betas


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


def save_like_lightning_1x(obj: dict, path, monkeypatch, callbacks=("model_checkpoint.ModelCheckpoint",),
                           zipped: bool = True) -> None:
    """torch.save ``obj`` with ``"callbacks"`` keyed by classes named as Lightning 1.x's callbacks (the released SD v1
    .ckpt files hold ModelCheckpoint), and numpy values (``global_step``). The fake modules exist only while saving,
    so the load cannot import the classes."""
    keys = {}
    with monkeypatch.context() as m:
        for part in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            m.setitem(sys.modules, part, types.ModuleType(part))
        for cb in callbacks:
            module, _, name = f"pytorch_lightning.callbacks.{cb}".rpartition(".")
            m.setitem(sys.modules, module, sys.modules.get(module, types.ModuleType(module)))
            cls = type(name, (), {"__module__": module})
            setattr(sys.modules[module], name, cls)
            keys[cls] = {"best_model_score": torch.tensor(0.25), "dirpath": "/logs/checkpoints", "monitor": None}
        torch.save({**obj, "callbacks": keys, "global_step": np.int64(470000), "epoch": np.int32(3),
                    "scale": np.ones(2, dtype=np.float32)}, path, _use_new_zipfile_serialization=zipped)
    assert "pytorch_lightning" not in sys.modules


def test_lightning_1x_checkpoint_loads_its_weights_with_inert_stand_ins(tmp_path, monkeypatch, caplog):
    path = tmp_path / "v1-5-like.ckpt"
    save_like_lightning_1x({"state_dict": {"a.b": torch.arange(3.0)}}, path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        sd, meta = read_state_dict(path)
    assert list(sd) == ["a.b"] and torch.equal(sd["a.b"], torch.arange(3.0)) and meta == {}
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in caplog.text
    assert "numpy.core.multiarray.scalar" in caplog.text or "numpy._core.multiarray.scalar" in caplog.text
    _, obj = pickled_tensors(path)
    assert isinstance(obj, dict) and "a.b" in obj  # the state_dict, unwrapped


def test_inert_stand_ins_keep_their_arguments_and_run_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    save_like_lightning_1x({"state_dict": {}}, path, monkeypatch)
    from ldm.checkpoint import load_pickle

    obj = load_pickle(path)
    (key, state), = obj["callbacks"].items()
    assert issubclass(key, Inert) and key.name.endswith("ModelCheckpoint")
    assert state["dirpath"] == "/logs/checkpoints" and torch.equal(state["best_model_score"], torch.tensor(0.25))
    assert isinstance(obj["global_step"], Inert) and not isinstance(obj["global_step"], (int, np.integer))


def test_an_allowed_name_does_not_let_other_globals_through(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "mixed.ckpt"
    save_like_lightning_1x({"state_dict": {"w": torch.zeros(1)}, "payload": Evil(marker)}, path, monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="mixed.ckpt.*refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_ldm_load_takes_a_released_style_ckpt(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    sd = dict(model.state_dict())
    sd.update(ldm_schedule_buffers(make_betas("linear")))
    path = tmp_path / "released.ckpt"
    save_like_lightning_1x({"state_dict": sd}, path, monkeypatch)
    back = ldm.load(path, "configs/tiny/txt2img.yaml")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_other_lightning_callbacks_stand_in_too(tmp_path, monkeypatch, caplog, zipped):
    path = tmp_path / "two-callbacks.ckpt"
    save_like_lightning_1x({"state_dict": {"w": torch.ones(2)}}, path, monkeypatch, zipped=zipped,
                           callbacks=("model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping"))
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        if zipped:  # torch lists the zip file's globals: every pytorch_lightning.callbacks.* one stands in
            sd, _ = read_state_dict(path)
            assert torch.equal(sd["w"], torch.ones(2)) and "EarlyStopping" in caplog.text
        else:  # legacy format: only the fixed list, so EarlyStopping is refused, by name
            with pytest.raises(UnsafeCheckpointError, match="EarlyStopping"):
                read_state_dict(path)


@pytest.mark.parametrize("free_mib, named", [(3, True), (500, False)])
def test_a_write_that_fills_the_disk_names_the_file_and_the_free_space(tmp_path, monkeypatch, free_mib, named):
    """torch's writer reports a full disk as "basic_ios::clear: iostream error": atomic_write says what happened
    (ENOSPC, the file, the free space) when little is left, and leaves other errors as they are; no file is left."""
    import errno
    import shutil

    target = tmp_path / "last.ckpt"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free_mib * 2**20))

    def fill(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 2**20)
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises((OSError, RuntimeError)) as e:
        atomic_write(target, fill)
    if named:
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
        assert f"no space left to write {str(target)!r}: 3.0 MiB free" in str(e.value)
        assert "1.0 MiB of it were written" in str(e.value) and "basic_ios::clear" in str(e.value)
    else:
        assert type(e.value) is RuntimeError and str(e.value) == "basic_ios::clear: iostream error"
    assert list(tmp_path.iterdir()) == []
