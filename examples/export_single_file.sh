#!/usr/bin/env bash
# Turn a training result (or any diffusers SD folder / checkpoint-STEP folder) into one .safetensors file in the
# original CompVis key layout that A1111, ComfyUI and diffusers' from_single_file load; then sample from it.
# Usage: examples/export_single_file.sh MODEL_DIR OUT.safetensors
set -euo pipefail
MODEL=${1:?model folder}; OUT=${2:?output .safetensors}
ldm export "$MODEL" --single-file "$OUT" --dtype fp16
ldm txt2img "a photograph of an astronaut riding a horse" --model "$OUT" --seed 0 -o outputs/exported
