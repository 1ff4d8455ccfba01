"""ldm init-model: write a random-initialised model folder from an architecture config.

  ldm init-model --config configs/models/tiny.yaml --output tiny-model --seed 0
  ldm init-model --config sd15 --output sd15-random

The folder is a plain diffusers StableDiffusionPipeline folder in safetensors (tests, benchmarks, and the
starting point for training from scratch).
"""

from __future__ import annotations

import argparse
import sys

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm init-model") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="architecture YAML, or a name under configs/models (tiny, sd15, sd21)")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.models import init_model, load_model_spec

    spec = load_model_spec(args.config)
    out = init_model(spec, args.output, seed=args.seed, overwrite=args.overwrite)
    print(out)
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm init-model") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
