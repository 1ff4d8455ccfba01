#!/usr/bin/env bash
# LoRA training on SD 1.5 (configs/train/sd15_lora.yaml: rank 16, lr 1e-4), then sampling with the adapters.
# Usage: examples/train_lora.sh MODEL DATA OUTPUT_DIR [key=value ...]   (add --train-text-encoder for TE adapters)
set -euo pipefail
MODEL=${1:?model}; DATA=${2:?data}; OUT=${3:?output dir}; shift 3
ldm train --config sd15_lora --model "$MODEL" --data "$DATA" --output-dir "$OUT" --resume latest --cache-latents "$@"
ldm txt2img --model "$MODEL" --lora "$OUT/final" --lora-scale 0.8 --seed 0 -o "$OUT/txt2img" \
  "a watercolor painting of a fox in a snowy forest"
