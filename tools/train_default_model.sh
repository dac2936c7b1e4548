#!/usr/bin/env bash
# Rebuild radtrt's embedded default model (radtrt/assets/default-model) from nothing, with radtrt's
# own commands: synthetic phantoms -> tokenizer -> fresh model -> stage 0 trunk (finding
# classification) -> stage 0 decoder (reports) -> stage 1 (projector) -> stage 2 (LoRA + projector)
# -> held-out check -> float16 copy into the package.
#
#   tools/train_default_model.sh [WORK_DIR]          (about 30 minutes on 2 shared CPU cores)
#
# Single-threaded torch (THREADS=1) is faster for these small matrices on a shared 2-core machine
# and makes the floating-point results reproducible run to run; other thread counts or torch
# versions give slightly different weights. The committed weights were made with torch 2.13 CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RADTRT=${RADTRT:-radtrt}
WORK=${1:-default-model-work}
THREADS=${THREADS:-1}
ASSET=${ASSET:-radtrt/assets/default-model}
export OMP_NUM_THREADS=$THREADS

$RADTRT data phantoms -o "$WORK/train" --n 4000 --seed 1 --formats png
$RADTRT data phantoms -o "$WORK/heldout" --n 300 --seed 2
$RADTRT train tokenizer "$WORK/train/manifest.jsonl" -o "$WORK/tokenizer" --vocab-size 1024
$RADTRT train init --tokenizer "$WORK/tokenizer" --arch phantom --seed 0 -o "$WORK/init" --name radtrt-phantom
common=(--preset phantom --threads "$THREADS")
$RADTRT train vision "$WORK/train/manifest.jsonl" --model "$WORK/init" -o "$WORK/vision" "${common[@]}"
$RADTRT train lm "$WORK/train/manifest.jsonl" --model "$WORK/vision/model" -o "$WORK/lm" "${common[@]}"
$RADTRT train stage1 "$WORK/train/manifest.jsonl" --model "$WORK/lm/model" -o "$WORK/stage1" "${common[@]}"
$RADTRT train stage2 "$WORK/train/manifest.jsonl" --model "$WORK/stage1/model" -o "$WORK/stage2" "${common[@]}" \
    --name radtrt-phantom-default
rm -rf "$WORK/asset"
$RADTRT convert --model "$WORK/stage2/model" -o "$WORK/asset" --dtype float16
mkdir -p "$ASSET"
install -m 644 "$WORK"/asset/{config.json,model.safetensors,tokenizer.model,tokenizer_config.json} "$ASSET"/
$RADTRT train eval "$WORK/heldout/manifest.jsonl" --model "$ASSET" --threads "$THREADS" --json \
    > "$WORK/heldout-eval.json"
python - "$WORK/heldout-eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"held-out micro-F1 {r['micro_f1']:.3f} macro-F1 {r['macro_f1']:.3f} (n={r['n']})")
PY
