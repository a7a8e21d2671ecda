"""Config loading: allowlisted targets, unknown keys, overrides, original SD YAMLs."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ldm.config import find_config, load_config, parse_overrides
from ldm.lr_schedule import LambdaLinearScheduler
from ldm.registry import LDM_ALIASES, REGISTRY, ConfigError, instantiate, resolve


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_alias_maps_to_an_entry_and_imports():
    for alias, short in LDM_ALIASES.items():
        assert short in REGISTRY, alias
    for name in REGISTRY:
        assert callable(resolve(name))


def test_arbitrary_target_is_refused_naming_target_and_file(tmp_path):
    p = write(tmp_path, "model:\n  target: os.system\n  params: {command: 'touch pwned'}\n")
    cfg = load_config(p)
    with pytest.raises(ConfigError, match=r"os\.system.*not allowed") as e:
        instantiate(cfg.model, str(p))
    assert str(p) in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_unknown_param_is_named():
    with pytest.raises(ConfigError, match="warm_up_stepz"):
        instantiate({"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                     "params": {"warm_up_stepz": [1], "f_min": [1], "f_max": [1], "f_start": [0], "cycle_lengths": [10]}})


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "model: {target: Identity}\nmodle: 3\n")
    with pytest.raises(ConfigError, match=r"modle") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_overrides_merge_and_typos_fail(tmp_path):
    p = write(tmp_path, "model:\n  target: Identity\n  params: {}\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["train.lr=3e-4", "train.new_key=5", "trainer.devices=2"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.new_key == 5 and cfg.trainer.devices == 2
    with pytest.raises(ConfigError, match="model.paramz"):
        load_config(p, ["model.paramz.x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_a_key_set_to_null_can_be_overridden(tmp_path):
    p = write(tmp_path, "model:\n  target: Identity\n  params: {path: null, package: x}\n")
    cfg = load_config(p, ["model.params.path=/some/dir", "model.params.package=null"])
    assert cfg.model.params.path == "/some/dir" and cfg.model.params.package is None
    with pytest.raises(ConfigError, match="model.params.pth"):
        load_config(p, ["model.params.pth=1"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_original_sd_yamls_parse_and_use_only_allowlisted_targets():
    for name in ("sd/v1-inference.yaml", "sd/v2-inference.yaml", "sd/v2-inference-v.yaml"):
        cfg = load_config(find_config(name))
        targets = [v for k, v in _walk(OmegaConf.to_container(cfg)) if k == "target"]
        assert targets and all(resolve(t) for t in targets)
    assert load_config("sd/v2-inference-v.yaml").model.params.parameterization == "v"


def _walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _original_lambda_linear(n, warm, f_min, f_max, f_start, cycles):
    """The original ldm/lr_scheduler.py LambdaLinearScheduler.schedule, transcribed as a reference."""
    cum = [0]
    for c in cycles:
        cum.append(cum[-1] + c)
    interval = 0
    for cl in cum[1:]:
        if n <= cl:
            break
        interval += 1
    c = interval
    n = n - cum[c]
    if n < warm[c]:
        return (f_max[c] - f_start[c]) / warm[c] * n + f_start[c]
    return f_min[c] + (f_max[c] - f_min[c]) * (cycles[c] - n) / cycles[c]


@pytest.mark.parametrize("n", [0, 1, 500, 9999, 10000, 10001, 25000, 40000, 59999])
def test_lambda_linear_matches_original(n):
    args = ([10000, 500], [0.5, 0.1], [1.0, 0.8], [1e-6, 0.2], [30000, 30000])
    assert LambdaLinearScheduler(*args)(n) == pytest.approx(_original_lambda_linear(n, *args))
