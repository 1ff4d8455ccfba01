#!/usr/bin/env bash
# Full fine-tune of Stable Diffusion 1.5 on one GPU (configs/train/sd15_finetune.yaml: fp16, EMA, min-SNR, 512px).
# Usage: examples/train_sd15_finetune.sh MODEL DATA OUTPUT_DIR [key=value ...]
#   MODEL: diffusers folder, .safetensors or hub id; DATA: webdataset shards ('shards/{00000..00099}.tar'), parquet,
#   or an image folder. Re-running the same command continues from the newest checkpoint (--resume latest).
set -euo pipefail
MODEL=${1:?model}; DATA=${2:?data}; OUT=${3:?output dir}; shift 3
ldm train --config sd15_finetune --model "$MODEL" --data "$DATA" --output-dir "$OUT" --resume latest "$@"
echo "sample: ldm txt2img --model $OUT/final \"a photograph of an astronaut riding a horse\""
