"""scripts/bench_autotune_log.py: inductor's max-autotune report, read from a log (lines as torch 2.11 prints them on
an H200, shortened)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

LOG = """\
Loading pipeline components...: 100%|██████████| 5/5
AUTOTUNE convolution(2x320x64x64, 320x320x3x3)
strides: [1310720, 1, 20480, 320], [2880, 1, 960, 320]
dtypes: torch.float16, torch.float16
  triton_convolution2d_20 0.0404 ms 100.0% ALLOW_TF32=False, BLOCK_K=64, BLOCK_M=64, STRIDE_H=1, num_warps=4
  triton_convolution2d_26 0.0477 ms 84.7% ALLOW_TF32=False, BLOCK_K=128, BLOCK_M=64, STRIDE_H=1, num_warps=4
  convolution 0.0517 ms 78.2% 
SingleProcess AUTOTUNE benchmarking takes 7.9545 seconds and 0.0003 seconds precompiling for 18 choices
Autotune Choices Stats:
{"num_choices": 18, "num_triton_choices": 17, "best_kernel": "triton_convolution2d_20"}
AUTOTUNE convolution(2x1280x16x16, 1280x1280x3x3)
strides: [327680, 1, 20480, 1280], [11520, 1, 3840, 1280]
dtypes: torch.float16, torch.float16
  triton_convolution2d_60 0.0400 ms 100.0% ALLOW_TF32=False, BLOCK_K=128, BLOCK_M=128, STRIDE_H=2, num_warps=8
  convolution 0.0450 ms 88.9% 
  triton_convolution2d_61 0.0538 ms 74.3% ALLOW_TF32=False, BLOCK_K=64, BLOCK_M=64, STRIDE_H=2, num_warps=4
SingleProcess AUTOTUNE benchmarking takes 10.4224 seconds and 0.0004 seconds precompiling for 18 choices
AUTOTUNE addmm(2x1280, 2x320, 320x1280)
strides: [0, 1], [320, 1], [1, 320]
dtypes: torch.float16, torch.float16, torch.float16
  triton_mm_45 0.0088 ms 100.0% ACC_TYPE='tl.float32', BLOCK_K=64, BLOCK_M=16, BLOCK_N=128, num_warps=8
SingleProcess AUTOTUNE benchmarking takes 5.5627 seconds and 0.0003 seconds precompiling for 20 choices
"""


def test_each_tuned_operation_gives_the_best_triton_template_against_aten():
    from bench_autotune_log import parse

    rows = parse(LOG.splitlines(keepends=True))
    assert [(r["op"], r["shapes"]) for r in rows] == [
        ("convolution", "2x320x64x64, 320x320x3x3"), ("convolution", "2x1280x16x16, 1280x1280x3x3"),
        ("addmm", "2x1280, 2x320, 320x1280")]
    conv, slower, mm = rows
    assert conv["triton_ms"] == 0.0404 and conv["aten_ms"] == 0.0517 and conv["speedup"] == round(0.0517 / 0.0404, 3)
    assert conv["conv_stride"] == 1 and conv["choices"] == 18 and conv["benchmark_s"] == 7.9545
    assert conv["strides"].startswith("[1310720, 1, 20480, 320]") and "BLOCK_K=64" in conv["triton_config"]
    assert conv["triton_warps"] == 4 and conv["safe_triton_ms"] == 0.0404 and conv["safe_speedup"] == conv["speedup"]
    # an 8-warp template was fastest, but it may compute wrong results: among the 4-warp ones cuDNN wins
    assert slower["triton_ms"] == 0.04 and slower["triton_warps"] == 8 and slower["speedup"] > 1
    assert slower["safe_triton_ms"] == 0.0538 and slower["safe_speedup"] < 1
    assert slower["conv_stride"] == 2  # read from the best template's config
    assert mm["aten_ms"] is None and not mm["aten_in_top"] and mm["speedup"] is None  # cuBLAS not in the top list


def test_the_command_writes_rows_and_names_a_missing_log(tmp_path):
    log, out = tmp_path / "tune.log", tmp_path / "rows.jsonl"
    log.write_text(LOG)
    script = str(ROOT / "scripts" / "bench_autotune_log.py")
    proc = subprocess.run([sys.executable, script, str(log), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and {r["what"] for r in rows} == {"autotune_choice"} and rows[0]["log"] == "tune.log"
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing.log")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no such log" in proc.stderr and "missing.log" in proc.stderr
