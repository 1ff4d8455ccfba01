"""ldm recipe: run a whole multi-stage training recipe as one reproducible command.

  ldm recipe shapes --output-dir runs/shapes --seed 0                 # the shipped model (about 80 min on 2 CPU cores)
  ldm recipe shapes --output-dir runs/shapes-smoke --budget tiny      # every stage for a few steps (CI)
  ldm recipe shapes --output-dir runs/shapes train_overrides.max_steps=5000 --package

Stages: make-shapes → train-vae → tokenizer → ldm train (UNet + text encoder) → ldm eval → packaging. An interrupted
recipe continues from the last finished stage (and the stage's last checkpoint) when run again.
"""

from __future__ import annotations

import argparse
import sys

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm recipe") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", choices=["shapes"], help="which recipe")
    p.add_argument("--output-dir", required=True, help="where every stage writes")
    p.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and training")
    p.add_argument("--budget", choices=["full", "tiny"], default="full", help="tiny: a few steps per stage")
    p.add_argument("--package", action="store_true", help="copy the model into the package as the default --model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe fields, e.g. train_overrides.max_steps=500")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.config import from_dict, merge, parse_overrides, to_dict
    from ldm_pipeline.extras import check_packages
    from ldm_pipeline.shapes.recipe import TINY_BUDGET, ShapesRecipe, run_recipe

    # every stage's needs, checked before the first stage writes anything
    check_packages({"pyarrow": "writing the dataset", "webdataset": "reading it", "braceexpand": "reading it",
                    "fsspec": "reading it", "tokenizers": "training the tokenizer",
                    "tensorboard": "the training logs"}, "ldm recipe")

    data = {"output_dir": args.output_dir, "seed": args.seed, "package": args.package,
            "progress": not args.no_progress}
    if args.budget == "tiny":
        data = merge(TINY_BUDGET, data)
    recipe = from_dict(ShapesRecipe, merge(to_dict(ShapesRecipe()), merge(data, parse_overrides(args.overrides))))
    metrics = run_recipe(recipe)
    d = metrics["scores"]["default"]["txt2img"]
    print(f"held-in {d['held_in_accuracy']}, held-out {d['held_out_accuracy']}, position {d['position_accuracy']}, "
          f"VAE PSNR {metrics['vae']['psnr']:.2f} dB")
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm recipe") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
