#!/usr/bin/env bash
# The embedded default on a GPU within a fixed budget of minutes per stage, then evaluation on held-out prompts.
#   scripts/emoji_gpu_recipe.sh [OUT_DIR] [AE_MIN] [CLIP_MIN] [UNET_MIN]      (DEVICES=2 for two GPUs, DDP)
# Stages stop at their time budget (trainer.max_time); KILL_AND_RESUME=1 kills the U-Net stage with SIGKILL after its
# first checkpoint and resumes it (--resume auto), as a pre-empted cluster job would be. The U-Net exports a snapshot
# every SNAPSHOT_MIN minutes (default: a tenth of its budget); the evaluation scores each one on the held-out prompts,
# which gives the curve of the metric against GPU minutes (eval/curve.json), then the final model with every sampler.
# The U-Net trains on latents and token states encoded once after the first two stages (LATENTS=0: on the images).
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/emoji}; AE=${2:-2}; CLIP=${3:-2}; UNET=${4:-5}; DEV=${DEVICES:-1}; DATA=${DATA:-data/emoji64}
STRAT=$([ "$DEV" -gt 1 ] && echo ddp || echo auto)
SNAP=${SNAPSHOT_MIN:-$($PY -c "print($UNET / 10)")}
hms() { $PY -c "s = round($1 * 60); print(f'00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}')"; }  # minutes → DD:HH:MM:SS
common=(data.train=$DATA data.num_workers=${WORKERS:-6} trainer.devices=$DEV trainer.strategy=$STRAT trainer.max_steps=-1 trainer.enable_progress_bar=false)
[ -f "$DATA/manifest.json" ] || $PY scripts/prepare_data.py emoji --size 64 --out "$DATA"
t0=$(date +%s)
$PY scripts/train.py --config configs/emoji/autoencoder.yaml --run-dir "$OUT/ae" "${common[@]}" \
  trainer.max_time=$(hms "$AE")
$PY scripts/train.py --config configs/emoji/clip.yaml --run-dir "$OUT/clip" "${common[@]}" \
  trainer.max_time=$(hms "$CLIP")
components=(train.components.first_stage_model="$OUT/ae/model.safetensors"
            train.components.cond_stage_model="$OUT/clip/model.safetensors")
unet_data=()
if [ "${LATENTS:-1}" = 1 ]; then
  $PY scripts/cache_latents.py --config configs/emoji/unet.yaml --data "$DATA" --out "$OUT/latents" \
    --split train,heldout --context --overwrite --batch-size 256 "${components[@]}"
  unet_data=(data.train="$OUT/latents")
fi
unet=(--config configs/emoji/unet.yaml --run-dir "$OUT/unet" --resume auto "${common[@]}" "${unet_data[@]}"
      "${components[@]}" train.snapshot_every_min="$SNAP" trainer.max_time=$(hms "$UNET"))
if [ "${KILL_AND_RESUME:-0}" = 1 ]; then
  setsid $PY scripts/train.py "${unet[@]}" train.checkpoint.every_n_steps=500 > "$OUT/unet_killed.log" 2>&1 &
  pid=$!
  until ls "$OUT"/unet/checkpoints/step*.ckpt >/dev/null 2>&1; do sleep 2; kill -0 $pid 2>/dev/null || break; done
  sleep 5; kill -9 -- -"$pid" 2>/dev/null || true; wait $pid 2>/dev/null || true
  echo "killed the U-Net stage after $(ls "$OUT"/unet/checkpoints/step*.ckpt | tail -1); resuming"
fi
$PY scripts/train.py "${unet[@]}" train.checkpoint.every_n_steps=${CKPT_EVERY:-2000}
echo "training took $(( $(date +%s) - t0 )) s"
$PY scripts/evaluate.py --model "$OUT/unet/model.safetensors" --clip "$OUT/clip/model.safetensors" --data "$DATA" \
  --out "$OUT/eval" --n "${EVAL_N:-256}" --snapshots "$OUT/unet/snapshots/index.jsonl" \
  --samplers "${SAMPLERS:-dpmpp_2m:20,dpmpp_2m:10,dpmpp_2m:50,ddim:10,ddim:20,ddim:50,euler:10,euler:20,euler:50,unipc:10,unipc:20,unipc:50}"
