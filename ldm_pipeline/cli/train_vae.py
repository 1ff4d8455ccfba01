"""ldm train-vae: train the autoencoder (stage 1 of a latent diffusion model) and measure it.

  ldm train-vae --data shapes/ --output-dir runs/shapes-vae                  # configs/train/shapes_vae.yaml
  ldm train-vae --data shapes/ --output-dir runs/vae --model config:shapes --max-steps 300 kl_weight=1e-5
  ldm train-vae --data 'shards/{00000..00009}.tar' --eval-data heldout/ --output-dir runs/vae --resume latest

The last shard of --data is held out (or --eval-data is): PSNR and the latent scaling factor (1/std of
posterior samples, as SD computed 0.18215) are measured on it. Outputs in OUTPUT_DIR: vae/ (diffusers
AutoencoderKL folder, scaling_factor in its config.json), metrics.json, reconstructions.png (originals over
reconstructions), loss_curve.png, train_vae_config.yaml, checkpoint-STEP/ with checkpoint_every.
Precedence: VAETrainConfig defaults < --config YAML < flags < trailing key=value overrides. Exit 2: bad input.
"""

from __future__ import annotations

import argparse
import sys

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm train-vae") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any config field, e.g. kl_weight=1e-5 eval_every=50")
    p.add_argument("--config", default="shapes_vae", help="training YAML, or a name under configs/train")
    p.add_argument("--model", help="configs/models YAML (name or path) whose vae: block is built, or an AutoencoderKL folder")
    p.add_argument("--data", help="training images: tar shards (dir, glob, brace range, URL), parquet, image folder, HF name")
    p.add_argument("--eval-data", help="held-out images (default: the last shard of --data)")
    p.add_argument("--output-dir", help="where the VAE, metrics and pictures go")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--learning-rate", "--lr", type=float, help="peak learning rate")
    p.add_argument("--resolution", type=int, help="training image side in pixels")
    p.add_argument("--seed", type=int, help="seed of the random init and posterior samples")
    p.add_argument("--resume", help="'latest' (newest checkpoint in --output-dir, or a fresh start) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete a non-empty --output-dir and start over")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", dest="progress_bar", action="store_false", default=None, help="no tqdm bar")
    return p


def config_from_args(args: argparse.Namespace):
    """The VAETrainConfig: YAML, then flags, then key=value overrides."""
    from ldm_pipeline.config import parse_overrides
    from ldm_pipeline.training.vae import load_vae_train_config

    flags = {
        "model": args.model, "eval_data": args.eval_data, "output_dir": args.output_dir,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "seed": args.seed, "resume": args.resume, "overwrite": args.overwrite, "device": args.device,
        "progress_bar": args.progress_bar,
        "data": {k: v for k, v in {"source": args.data, "resolution": args.resolution}.items() if v is not None},
    }
    return load_vae_train_config(args.config, flags, parse_overrides(args.overrides))


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.training.vae import train_vae

    result = train_vae(config_from_args(args))
    print(f"{result.vae_dir}: PSNR {result.psnr:.2f} dB on held-out images, scaling_factor "
          f"{result.scaling_factor:.4f}, {result.steps} steps in {result.seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm train-vae") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
