#!/usr/bin/env bash
# Data-parallel training on all GPUs of this machine with accelerate (DDP). Set num_processes in
# configs/accelerate/multi_gpu.yaml to the GPU count (or pass --num_processes N). batch_size is per GPU:
# samples per optimizer step = batch_size x gradient_accumulation_steps x GPUs.
# Several nodes: use configs/accelerate/multi_node.yaml and run this on every node with --machine_rank.
# Usage: examples/train_multi_gpu.sh MODEL DATA OUTPUT_DIR [NUM_GPUS] [key=value ...]
set -euo pipefail
MODEL=${1:?model}; DATA=${2:?data}; OUT=${3:?output dir}; NGPU=${4:-$(nvidia-smi -L | wc -l)}; shift $(( $# >= 4 ? 4 : 3 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
accelerate launch --config_file "$HERE/configs/accelerate/multi_gpu.yaml" --num_processes "$NGPU" \
  -m ldm_pipeline train --config sd15_finetune --model "$MODEL" --data "$DATA" --output-dir "$OUT" \
  --resume latest "$@"
