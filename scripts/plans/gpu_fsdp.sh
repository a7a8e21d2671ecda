#!/usr/bin/env bash
# trainer.strategy=fsdp on one card: SD-1.5's U-Net (random weights, EMA,
# gradient checkpointing, bf16) at 256 px, batch 16, without a strategy and under fsdp: img/s from the runs' logs and
# the card's peak memory (nvidia-smi, every 200 ms), then the GPU test (tests/test_fsdp.py). With one rank nothing is
# split: this measures FSDP's own cost.
# RESUME_STEPS=N (default 0): after each run, N more steps resumed from its last checkpoint without a strategy (an
# fsdp checkpoint read by a plain run). COMPILE_BATCH=B (default 0): the bare step compiled (train.compile) at batch B
# under each strategy, after the runs. TEST_S=0 leaves the GPU test out.
# PROFILE_STEPS=N (default 0) first times the bare U-Net step of each strategy on a synthetic latent cache
# (scripts/bench_train.py: same model and batch, no autoencoder or data decoding) and profiles N steps of it.
#   scripts/plans/gpu_fsdp.sh [OUT] [DATA]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu-fsdp}; DATA=${2:-data/emoji64}; STEPS=${STEPS:-40}  # STRATEGIES, TEST_S: see below
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if [ "${PROFILE_STEPS:-0}" -gt 0 ]; then
  for s in ${STRATEGIES:-auto fsdp}; do
    timeout -s KILL 150 $PY scripts/bench_train.py --latent 32 --batch 16 --steps 30 --warmup 10 \
      --profile-steps "$PROFILE_STEPS" --override trainer.strategy=$s --out "$OUT/profile-$s.jsonl" \
      > "$OUT/profile-$s.log" 2>&1
    echo "profile strategy=$s rc=$?" | tee -a "$OUT/summary.txt"
  done
fi
for s in ${STRATEGIES:-auto fsdp}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/mem-$s.txt" & smi=$!
  t0=$(date +%s)
  timeout -s KILL 170 $PY scripts/train.py --config configs/diffusion/sd-v1-finetune.yaml --run-dir "/tmp/fsdp-$s" \
    trainer.strategy=$s train.init_checkpoint=null data.train="$DATA" data.size=256 data.batch_size=16 \
    trainer.max_steps="$STEPS" trainer.log_every_n_steps=10 sample.every_n_steps=0 trainer.enable_progress_bar=false \
    train.warmup_steps=0 > "$OUT/train-$s.log" 2>&1
  rc=$?; kill $smi
  peak=$(sort -n "$OUT/mem-$s.txt" | tail -1)
  echo "strategy=$s rc=$rc in $(( $(date +%s) - t0 )) s; peak memory ${peak} MiB" | tee -a "$OUT/summary.txt"
  $PY - "/tmp/fsdp-$s" <<'PY' | tee -a "$OUT/summary.txt"
import statistics, sys
from ldm.training.logs import logged
v = logged(sys.argv[1], "train/img_per_s"); loss = logged(sys.argv[1], "train/loss")
steps = sorted(v)[2:]  # after the first 20 steps (allocator warm-up)
print(f"  img/s median over steps {steps}: {statistics.median(float(v[s]) for s in steps):.1f}; "
      f"loss {[round(float(loss[s]), 4) for s in sorted(loss)][-3:]}")
PY
  grep -h -E "Error|error" "$OUT/train-$s.log" | tail -3
  if [ "${RESUME_STEPS:-0}" -gt 0 ]; then
    timeout -s KILL 170 $PY scripts/train.py --config configs/diffusion/sd-v1-finetune.yaml --run-dir "/tmp/fsdp-$s" \
      --resume auto trainer.strategy=auto train.init_checkpoint=null data.train="$DATA" data.size=256 \
      data.batch_size=16 trainer.max_steps=$(( STEPS + RESUME_STEPS )) trainer.log_every_n_steps=5 \
      sample.every_n_steps=0 trainer.enable_progress_bar=false train.warmup_steps=0 > "$OUT/resume-$s.log" 2>&1
    echo "  resumed without a strategy to step $(( STEPS + RESUME_STEPS )): rc=$?" | tee -a "$OUT/summary.txt"
    grep -h -E "Error|error|Restored|resum" "$OUT/resume-$s.log" | tail -3 | tee -a "$OUT/summary.txt"
    $PY -c "import sys; from ldm.training.logs import logged; l = logged(sys.argv[1], 'train/loss');
print('  loss by step', {k: round(float(v), 4) for k, v in sorted(l.items())})" "/tmp/fsdp-$s" \
      | tee -a "$OUT/summary.txt"
  fi
done
if [ "${COMPILE_BATCH:-0}" -gt 0 ]; then
  for s in ${STRATEGIES:-auto fsdp}; do
    timeout -s KILL 200 $PY scripts/bench_train.py --latent 32 --batch "$COMPILE_BATCH" --steps 20 --warmup 8 \
      --compile --override trainer.strategy=$s --out "$OUT/compiled-$s.jsonl" > "$OUT/compiled-$s.log" 2>&1
    echo "compiled strategy=$s batch $COMPILE_BATCH rc=$?" | tee -a "$OUT/summary.txt"
    grep -h -E "img_per_s|first_step|Error" "$OUT/compiled-$s.log" | tail -4 | tee -a "$OUT/summary.txt"
  done
fi
[ "${TEST_S:-330}" -gt 0 ] || exit 0
timeout -s KILL "${TEST_S:-330}" $PY -m pytest -m gpu -o addopts="" -v -p no:cacheprovider tests/test_fsdp.py 2>&1 \
  | tail -8 \
  | tee "$OUT/gpu-test.txt"
