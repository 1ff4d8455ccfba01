#!/usr/bin/env bash
# Fine-tune on img2dataset parquet output (image bytes in `jpg`, caption in `caption`), keeping only large, safe,
# watermark-free, good-looking images, with aspect-ratio bucketing; resumes if the run was interrupted.
# Usage: examples/train_parquet_filtered.sh MODEL 'laion/*.parquet' OUTPUT_DIR [key=value ...]
set -euo pipefail
MODEL=${1:?model}; DATA=${2:?parquet files}; OUT=${3:?output dir}; shift 3
ldm train --config sd15_finetune --model "$MODEL" --data "$DATA" --data-format parquet --output-dir "$OUT" \
  --resume latest \
  data.filters.min_original_width=512 data.filters.min_original_height=512 \
  data.filters.max_punsafe=0.1 data.filters.max_pwatermark=0.5 data.filters.min_aesthetic=5.0 \
  data.bucketing=true data.center_crop=false "$@"
