#!/usr/bin/env bash
# FlashAttention-4 (attn_backend: fa4, ldm/attention_fa4.py) on a lent Hopper card, one 10-minute call: the kernels
# against SDPA's at SD-1.5's shapes (the CFG step's forward at batch 2, lone and from CUDA graphs; fa4 has no training
# rows: its backward is not used), the SDPA kernels' training rows (batch 16), the
# compiled CFG step with fa4 and with SDPA (two processes, diffusers in both as the anchor), after the -m fa4 tests.
# xformers 0.0.35 must not be importable beside flash-attn-4: it imports flash_attn.flash_attn_interface (FA2's)
# whenever a flash_attn package is found, and FA4's is one, so diffusers' pipelines fail to import.
# flash-attn-4 and the CUTLASS DSL must be importable (pip install 'ldm[fa4]', or PYTHONPATH to a folder that has
# them); their compiled kernels are cached on disk between the processes.
#   scripts/plans/gpu_fa4.sh [OUT]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu-fa4}
mkdir -p "$OUT"
if $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('xformers') is None)" 2>/dev/null; then
  echo "xformers is importable: with flash-attn-4's flash_attn beside it, diffusers fails to import; take it off" \
    "the path first (e.g. rm -rf /tmp/site/xformers*)" >&2
  exit 2
fi
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FA4_CACHE:-/tmp/fa4-cache}  # ldm turns the cache on
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
step() {  # LABEL LIMIT_S COMMAND...: run, log, say the exit status and the time
  local label=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  timeout -s KILL "$limit" "$@" > "$OUT/$label.log" 2>&1
  echo "$label rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
}
step tests "${TEST_S:-150}" $PY -m pytest -m fa4 -o addopts="" -v -p no:cacheprovider tests/test_attention_fa4.py
tail -3 "$OUT/tests.log"
step attention "${ATTN_S:-150}" $PY scripts/bench.py --only attention,attention_train --attn-train-batches 16 \
  --out "$OUT/attention.jsonl"
# a cold first process compiles both U-Nets (ours 69 s with fa4, diffusers 66 s on an H100, twenty-fourth session):
# 180 s stopped it after its rows; the second process finds diffusers' graph in the cache (125 s in all)
step unet-fa4 "${UNET_FA4_S:-${UNET_S:-220}}" $PY scripts/bench.py --compile --skip-eager --no-denoiser-graph \
  --only unet --unet-calls "${UNET_CALLS:-ldm_shared_x,diffusers}" --attn fa4 --out "$OUT/unet-fa4.jsonl"
step unet-sdpa "${UNET_S:-170}" $PY scripts/bench.py --compile --skip-eager --no-denoiser-graph --only unet \
  --unet-calls "${UNET_CALLS:-ldm_shared_x,diffusers}" --out "$OUT/unet-sdpa.jsonl"
$PY - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    for line in f.read_text().splitlines():
        r = json.loads(line)
        w = r.get("what", "")
        if w.startswith(("attention", "unet_")):
            keep = {k: r[k] for k in ("what", "impl", "variant", "median_s", "us_per_call", "tflops", "max_abs_diff",
                                      "value",
                                      "by_impl_ms", "error") if k in r}
            print(f.stem, json.dumps(keep))
PY
