"""The training DataModule's loader options (ldm.training.datamodule)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.registry import ConfigError
from ldm.training.datamodule import DataModule

SHARD = Path(__file__).parent / "fixtures" / "emoji" / "emoji32-000000.tar"


def _module(**data) -> DataModule:
    return DataModule(OmegaConf.create({"data": {"train": str(SHARD), "batch_size": 2, "num_samples": 8, "size": 32,
                                                 **data}, "train": {}}))


def _on(device: str) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))


@pytest.mark.parametrize("setting,device,pinned", [("auto", "cuda", True), ("auto", "cpu", False), (None, "cuda", True),
                                                   (False, "cuda", False), (True, "cpu", True)])
def test_batches_are_pinned_when_training_on_a_cuda_device_unless_the_config_says(setting, device, pinned):
    dm = _module(**({} if setting is None else {"pin_memory": setting}))
    dm.trainer = _on(device)
    assert dm.pin_memory() is pinned
    assert dm._loader(0, 0, 1).pin_memory is pinned  # what the DataLoader gets


def test_a_pin_memory_that_is_not_auto_true_or_false_is_named():
    with pytest.raises(ConfigError, match="data.pin_memory: expected auto, true or false, got 'yes'"):
        _module(pin_memory="yes")
