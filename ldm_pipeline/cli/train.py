"""ldm train: fine-tune a model's UNet (optionally its text encoder), or LoRA adapters, on captioned images.

  ldm train --config sd15_finetune --model runwayml/stable-diffusion-v1-5 --data 'shards/{00000..00099}.tar' \\
      --output-dir runs/sd15-ft
  ldm train --config sd15_lora --model sd15.safetensors --data shards/ --output-dir runs/lora --lora-rank 8
  ldm train --config sdxl_lora --model sd_xl_base_1.0.safetensors --data my_images/ --output-dir runs/xl-lora
  ldm train --config tiny_test --model config:tiny --data shapes/ --output-dir runs/tiny max_steps=30 \\
      data.random_flip=true                                   # config:NAME: random weights, configs/models/NAME.yaml
  ldm train --config tiny_test ... --resume latest            # continue after a crash or preemption (same model,
                                                              # caching and training settings, or exit 2)
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m ldm_pipeline train --config ...
  torchrun --nproc_per_node 8 -m ldm_pipeline train --config ...

Precedence: TrainConfig defaults < --config YAML < flags < trailing key=value overrides (dotted for nested keys).
Outputs in OUTPUT_DIR: checkpoint-STEP/ (resumable; pipeline/ inside loads with `ldm txt2img --model`),
final/ (diffusers folder, or LoRA weights for `ldm txt2img --lora`), samples/, logs/ (tensorboard),
loss_curve.png, metrics.json, train_config.yaml. Exit codes: 0 done, 2 bad input, 3 loss diverged (NaN/inf).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm_pipeline.cli.common import Parser, run_main


def build_parser(prog: str = "ldm train") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any config field, e.g. lora.rank=8 data.random_flip=true")
    p.add_argument("--config", help="training YAML, or a name under configs/train (sd15_finetune, sd15_lora, sdxl_finetune, "
                   "sdxl_lora, tiny_test)")
    p.add_argument("--model", help="diffusers folder, checkpoint folder, .safetensors, hub id, shipped model (shapes) "
                   "or config:NAME (random weights from configs/models/NAME.yaml)")
    p.add_argument("--data", help="training data: tar shards (dir, glob, brace range, URL), parquet, image folder, HF name")
    p.add_argument("--data-format", choices=["auto", "webdataset", "parquet", "imagefolder", "hf"], help="data layout (default: auto)")
    p.add_argument("--output-dir", help="where checkpoints, samples, logs and the final model go")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for (default 10000)")
    p.add_argument("--batch-size", type=int, help="micro-batch per process (default 1)")
    p.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per optimizer step (default 4)")
    p.add_argument("--resolution", type=int, help="training image side in pixels (default 512)")
    p.add_argument("--learning-rate", "--lr", type=float, help="peak learning rate (default 1e-5 full, 1e-4 LoRA)")
    p.add_argument("--lr-warmup-steps", type=int, metavar="N",
                   help="optimizer steps of linear warm-up from 0 to the peak rate (default 10%% of --max-steps, at "
                        "most 500); one not shorter than the run is kept, with a warning")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (default 500)")
    p.add_argument("--validate-every", type=int, help="optimizer steps between sample grids; 0 = off (default 500)")
    p.add_argument("--seed", type=int, help="seed of noise, timesteps and random model init (default 0)")
    p.add_argument("--resume", help="'latest' (newest checkpoint in --output-dir, or a fresh start) or a checkpoint path")
    p.add_argument("--allow-resume-changes", action="store_true", default=None,
                   help="resume even from a checkpoint of another --model, another --cache-latents setting or a changed "
                        "training config (refused by default; max_steps, intervals and output paths may always change)")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete a non-empty --output-dir and start over")
    p.add_argument("--cache-latents", action="store_true", default=None, help="encode images/captions once, then train on the cache")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the full UNet (0 = off)")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="also train the text encoder (LoRA: adapters on it)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], help="default auto: fp16 on CUDA, off on CPU")
    p.add_argument("--report-to", choices=["tensorboard", "wandb", "all", "none"], help="trackers (default tensorboard)")
    p.add_argument("--no-progress", dest="progress_bar", action="store_false", default=None, help="no tqdm bar")
    return p


def config_from_args(args: argparse.Namespace):
    """The resolved TrainConfig: YAML, then flags, then key=value overrides."""
    from ldm_pipeline.config import parse_overrides
    from ldm_pipeline.training.config import load_train_config

    flags = {
        "model": args.model, "output_dir": args.output_dir, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "lr_warmup_steps": args.lr_warmup_steps,
        "checkpoint_every": args.checkpoint_every,
        "validate_every": args.validate_every, "seed": args.seed, "resume": args.resume, "overwrite": args.overwrite,
        "allow_resume_changes": args.allow_resume_changes,
        "cache_latents": args.cache_latents, "train_text_encoder": args.train_text_encoder,
        "mixed_precision": args.mixed_precision, "report_to": args.report_to, "progress_bar": args.progress_bar,
        "data": {"source": args.data, "format": args.data_format, "resolution": args.resolution},
        "lora": {"rank": args.lora_rank},
    }
    flags = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
             for k, v in flags.items()}
    return load_train_config(args.config, flags, parse_overrides(args.overrides))


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, not the one of its first run: `main` runs in-process again and again
    (tests, notebooks), and a stream swapped out since (pytest's capture) may be closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_data_warnings(prog: str) -> None:
    """The library's warnings (an unreadable shard or parquet file, a warm-up longer than the run) as one line each
    on stderr; the data layer's per-worker INFO lines stay quiet (the loop prints the merged data summary after each
    epoch and at the end)."""
    log = logging.getLogger("ldm_pipeline")
    if not any(getattr(h, "ldm_cli", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
        handler.ldm_cli = True
        log.addHandler(handler)


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.training.loop import TrainingDiverged, train

    show_data_warnings(args.prog)
    config = config_from_args(args)
    try:
        train(config)
    except TrainingDiverged as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm train") -> int:
    parser = build_parser(prog)

    def body(args: argparse.Namespace) -> int:
        args.prog = parser.prog
        return run(args)

    return run_main(body, parser, argv)


if __name__ == "__main__":
    sys.exit(main(prog="ldm-train"))
