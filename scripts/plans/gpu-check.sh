#!/usr/bin/env bash
# The GPU checks of a lent call (docs/BENCHMARKS.md): the GPU tests, `make demo`'s job at the configs' own 64 px sizes
# on the card, and a U-Net stage with the training options added since the last GPU run (compile, gradient
# accumulation, validation, checkpoint and resume; its host time per hook from trainer.profiler=simple), then
# sampling. Results under OUT (default runs/gpu-check):
#   scripts/plans/gpu-check.sh [OUT] [DATA]       DATA: a built emoji dataset (prepare_data.py emoji --size 64)
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu-check}; DATA=${2:-data/emoji64}; WORK=${WORK:-/tmp/gpu-check}
ACCEL=${ACCEL:-gpu}; STEPS=${STEPS:-250 400 1100}; N=${N:-100}  # ACCEL=cpu STEPS="3 3 3" N=4: a dry run
PARTS=${PARTS:-tests demo train sample}  # a later call on the same warm machine may rerun only some (sample needs demo)
part() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
[ "$ACCEL" = gpu ] && part tests && $PY -m pytest -m gpu -o addopts="" -p no:cacheprovider -q tests/ 2>&1 \
  | tail -8 | tee "$OUT/gpu-tests.txt"
part demo && [ -d "$DATA" ] && { rm -rf "$WORK/demo/emoji64"; mkdir -p "$WORK/demo"; cp -r "$DATA" "$WORK/demo/emoji64"; }
part demo && { t0=$(date +%s)
$PY scripts/demo.py --out "$WORK/demo" --size 64 --unet-channels 128 --batch 128 --accelerator "$ACCEL" --steps $STEPS > "$WORK/demo.log" 2>&1
echo "demo rc=$? in $(( $(date +%s) - t0 )) s" | tee "$OUT/demo.txt"
grep -h -E 'val/|done in|demo finished|Error|error' "$WORK/demo.log" | tail -20 >> "$OUT/demo.txt"
cp "$WORK/demo/grid.png" "$OUT/demo-grid.png" 2>/dev/null; }
u=(--config configs/emoji/unet.yaml --run-dir "$WORK/unet" data.train="$WORK/demo/emoji64"
   train.components.first_stage_model="$WORK/demo/autoencoder/model.safetensors"
   train.components.cond_stage_model="$WORK/demo/clip/model.safetensors" trainer.enable_progress_bar=false
   train.compile=true trainer.accumulate_grad_batches=2 train.val_every_n_steps=$N train.checkpoint.every_n_steps=$N trainer.accelerator=$ACCEL
   sample.every_n_steps=0 trainer.log_every_n_steps=50)
part train && { t0=$(date +%s)
$PY scripts/train.py "${u[@]}" trainer.max_steps=$((2 * N)) trainer.profiler=simple > "$WORK/unet1.log" 2>&1
echo "unet (compile, accumulation 2, validation) $((2 * N)) steps rc=$? in $(( $(date +%s) - t0 )) s" | tee "$OUT/train.txt"
$PY scripts/train.py "${u[@]}" --resume auto trainer.max_steps=$((3 * N)) > "$WORK/unet2.log" 2>&1
echo "resumed to $((3 * N)) steps rc=$?" | tee -a "$OUT/train.txt"
grep -h -E 'val/|it/s|img/s|step|Error|error' "$WORK/unet1.log" "$WORK/unet2.log" | tail -25 >> "$OUT/train.txt"
grep -m 12 -E 'run_training_(epoch|batch)|training_step|dataloader_next|optimizer_step|on_train_batch_end' "$WORK/unet1.log" \
  | sed -E 's/ +/ /g' >> "$OUT/train.txt"  # Lightning's simple profiler: host time per hook
find "$WORK/unet" -name '*.csv' | head -3 | while read -r f; do echo "== $f"; tail -4 "$f"; done >> "$OUT/train.txt"; }
part sample || exit 0
# sampling on the card with the demo's U-Net: txt2img compiled (reduce-overhead) and eager replayed from CUDA graphs,
# img2img, inpainting
M="$WORK/demo/unet/model.safetensors"; S=(--checkpoint "$M" --ema --n 4 --device "$([ "$ACCEL" = gpu ] && echo cuda || echo cpu)")
$PY -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (64, 64), 'white'); ImageDraw.Draw(im).ellipse((8, 8, 56, 56), 'red'); im.save('$WORK/init.png'); m = Image.new('L', (64, 64), 0); ImageDraw.Draw(m).rectangle((32, 0, 63, 63), 255); m.save('$WORK/mask.png')"
for job in "txt2img|--prompt|red apple, flat emoji|--compile" "graphed|--prompt|red apple, flat emoji|--cuda-graph" \
           "img2img|--prompt|red apple, flat emoji|--init-image|$WORK/init.png|--strength|0.6" \
           "inpaint|--prompt|green circle, flat emoji|--init-image|$WORK/init.png|--mask|$WORK/mask.png"; do
  IFS='|' read -r -a a <<< "$job"; t0=$(date +%s.%N)
  $PY scripts/sample.py "${S[@]}" "${a[@]:1}" --out "$WORK/${a[0]}" > "$WORK/${a[0]}.log" 2>&1
  echo "${a[0]} rc=$? in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s, $(ls "$WORK/${a[0]}" 2>/dev/null | wc -l) files" | tee -a "$OUT/sample.txt"
  grep -v "it/s" "$WORK/${a[0]}.log" | tail -3 >> "$OUT/sample.txt"
done
