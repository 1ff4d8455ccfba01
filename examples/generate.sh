#!/usr/bin/env bash
# txt2img from a prompt file on every local GPU (or 2 CPU processes), then img2img of the first result and a
# bit-exact replay of it. Usage: examples/generate.sh MODEL prompts.txt [NUM_PROCESSES]
set -euo pipefail
MODEL=${1:?model}; PROMPTS=${2:?prompt file}; N=${3:-2}
if command -v nvidia-smi >/dev/null; then ENV=(); else ENV=(ACCELERATE_USE_CPU=true); fi
env "${ENV[@]}" torchrun --nproc_per_node "$N" -m ldm_pipeline txt2img --from-file "$PROMPTS" --model "$MODEL" \
  --seed 0 --scheduler dpm++2m-karras --steps 25 --grid -o outputs/txt2img
FIRST=$(ls outputs/txt2img/0*.png | head -1)
ldm img2img "an oil painting" --init-image "$FIRST" --model "$MODEL" --strength 0.6 --seed 0 -o outputs/img2img
ldm txt2img --replay "$FIRST" -o outputs/replay
