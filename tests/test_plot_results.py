"""scripts/plot_results.py: inputs checked (each bad one named) before anything is plotted."""
from __future__ import annotations

import json
import sys

import pytest

from script_loader import load_script


def _run(tmp_path, monkeypatch, *args: str):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        load_script("plot_results").main(list(args))
    return str(e.value.code)


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "notjson.json").write_text("nope")
    (tmp_path / "nometrics.json").write_text(json.dumps([{"train_s": 60, "metrics": {"train/x": {}}}]))
    good = {"fd_clip": 1.0, "retrieval@1": 0.3, "fd_clip_real_halves": 0.1, "real_retrieval@1": 0.4}
    (tmp_path / "curve.json").write_text(json.dumps([{"train_s": 60, "metrics": {"heldout/dpmpp_2m:30": good}}]))
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "metrics.csv").write_text("step,train/loss\n0,0.5\n1,0.4\n")
    (tmp_path / "norun").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["curve", "A=empty.json"], ["empty.json", "not a curve.json"]),
    (["curve", "A=notjson.json"], ["notjson.json", "not a readable curve.json"]),
    (["curve", "A=nometrics.json"], ["nometrics.json", "heldout/*"]),
    (["curve", "A=run"], ["run", "not a readable curve.json"]),
    (["loss", "A=norun"], ["norun", "no readable logs/metrics.csv"]),
    (["loss", "A=curve.json"], ["curve.json", "no readable logs/metrics.csv"]),
])
def test_bad_inputs_are_named_in_one_line(inputs, monkeypatch, capsys, args, words):
    """Were tracebacks (IndexError, JSONDecodeError, StopIteration, IsADirectoryError, NotADirectoryError, …)."""
    msg = _run(inputs, monkeypatch, *args, "--out", "p.png")
    assert msg.startswith("plot_results.py: error:") and all(w in msg for w in words), msg
    assert "Traceback" not in capsys.readouterr().err and not (inputs / "p.png").exists()


def test_an_out_in_a_file_is_refused_before_reading(inputs, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        monkeypatch.chdir(inputs)
        load_script("plot_results").main(["loss", "A=run", "--out", "afile/p.png"])
    assert e.value.code == 2 and "--out afile/p.png: its folder" in capsys.readouterr().err


@pytest.mark.parametrize("what, item", [("curve", "A=curve.json"), ("loss", "A=run")])
def test_without_matplotlib_the_message_says_what_to_install(inputs, monkeypatch, what, item):
    """Was a ModuleNotFoundError traceback (matplotlib is not a dependency of the package)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    msg = _run(inputs, monkeypatch, what, item, "--out", "p.png")
    assert msg == "plot_results.py: error: needs matplotlib: pip install matplotlib"
