"""ldm make-shapes: write the synthetic shapes dataset as img2dataset-layout webdataset shards.

  ldm make-shapes --output data/shapes --num-samples 50000 --seed 0

One shape (circle, square, triangle) of one of 8 colours on a plain background of another colour, 64x64, with
LAION-style captions in several phrasings; the pairs green triangle, purple circle, orange square and white circle
are never drawn (they measure compositional generalization). Output: NNNNN.tar (KEY.jpg, KEY.txt, KEY.json) beside
NNNNN.parquet and NNNNN_stats.json, so training reads it through the same data path as LAION.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm make-shapes") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--output", required=True, help="folder for the shards (must be empty or new)")
    p.add_argument("--num-samples", type=int, required=True, help="images to draw")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar")
    p.add_argument("--workers", type=int, default=1, help="processes drawing in parallel")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.errors import UserError
    from ldm_pipeline.extras import check_packages

    check_packages({"pyarrow": "the parquet written beside each shard"}, "ldm make-shapes")
    if args.num_samples < 1 or args.samples_per_shard < 1:
        raise UserError("--num-samples and --samples-per-shard must be at least 1")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: choose a new --output folder")
    from ldm_pipeline.shapes.domain import write_shards

    summary = write_shards(out, args.num_samples, seed=args.seed, samples_per_shard=args.samples_per_shard,
                           workers=args.workers)
    print(f"wrote {summary.num_samples} samples in {len(summary.tars)} shards to {out} ({summary.seconds:.1f} s)",
          file=sys.stderr)
    print(out)
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm make-shapes") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
