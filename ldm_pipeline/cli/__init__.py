"""ldm: latent diffusion from the command line.

Commands (``ldm COMMAND --help`` for each):
  txt2img      generate images from text prompts
  img2img      edit images with text prompts
  init-model   write a random-initialised model folder from configs/models/*.yaml
  train        fine-tune or train a model on LAION-style caption data (accelerate launch / torchrun)
  export       convert a model folder to a single-file (CompVis layout) .safetensors checkpoint
  train-vae    train the autoencoder (stage 1 of training from scratch)
  doctor       versions, devices and the shipped model's place, for bug reports

The shapes demo (ldm_pipeline/shapes/, the shipped model's world):
  make-shapes  write the synthetic shapes dataset (img2dataset-layout shards)
  eval         score prompt adherence in the shapes domain (txt2img and img2img recolour)
  recipe       a whole multi-stage training recipe (shapes: the shipped model)
"""

from __future__ import annotations

import importlib
import sys

# command → (module, one-line help); modules are imported only when their command runs, so `ldm --help` is instant
COMMANDS: dict[str, tuple[str, str]] = {
    "txt2img": ("ldm_pipeline.cli.txt2img", "generate images from text prompts"),
    "img2img": ("ldm_pipeline.cli.img2img", "edit images with text prompts"),
    "init-model": ("ldm_pipeline.cli.init_model", "write a random-initialised model folder from a config"),
    "train": ("ldm_pipeline.cli.train", "train or fine-tune on LAION-style caption data"),
    "export": ("ldm_pipeline.cli.export", "write a model folder as a single-file .safetensors checkpoint"),
    "train-vae": ("ldm_pipeline.cli.train_vae", "train the autoencoder (stage 1 of training from scratch)"),
    "doctor": ("ldm_pipeline.cli.doctor", "print versions, devices and known problems, for bug reports"),
    # the shapes demo (ldm_pipeline/shapes/): its commands live with it
    "make-shapes": ("ldm_pipeline.shapes.cli_make_shapes", "shapes demo: write its dataset as webdataset shards"),
    "eval": ("ldm_pipeline.shapes.cli_eval", "shapes demo: score a model's prompt adherence in the shapes domain"),
    "recipe": ("ldm_pipeline.shapes.cli_recipe", "shapes demo: train the shipped model, every stage, as one command"),
}


def _usage() -> str:
    lines = ["usage: ldm COMMAND [options]", "", "Latent text-to-image diffusion: generate, edit, train.", "", "commands:"]
    width = max(map(len, COMMANDS))
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_}")
    lines += ["", "Run 'ldm COMMAND --help' for a command's options.", "Also: python -m ldm_pipeline COMMAND ..."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``ldm COMMAND ...`` to the command's own ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ldm_pipeline import __version__

        print(f"ldm_pipeline {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"ldm: unknown command '{name}'{hint}; run 'ldm --help' for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"ldm {name}")
