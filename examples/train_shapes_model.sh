#!/usr/bin/env bash
# The shipped model, from nothing: synthetic LAION-style shards -> VAE -> tokenizer -> UNet + text encoder ->
# evaluation -> fp16 model folder with a model card, copied into the package as the default --model.
# About 80 minutes on 2 CPU cores; every stage resumes if interrupted (run the same command again).
set -euo pipefail
OUT=${1:-runs/shapes}
ldm recipe shapes --output-dir "$OUT" --seed 0 --package
python examples/shapes_grid.py --output docs/shapes_grid.png   # the README's sample grid
