"""Pieces shared by the command modules: the user-error wrapper, logging setup and the generation options
that txt2img and img2img have in common."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ldm_pipeline.errors import UserError


def quiet_libraries() -> None:
    """Silence library chatter that is not for our users (torchvision notices, weight-loading bars)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` and run `body`; a UserError becomes one line on stderr and exit code 2 (argparse's own code
    for usage errors), Ctrl-C exit code 130."""
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        return body(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the usage examples' line breaks and shows each option's default (unless None or already said)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with our help format; positionals (prompts, key=value overrides) may come before, between or after
    the flags."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="diffusers folder, training checkpoint folder, single-file .safetensors, configs/models YAML, or hub id "
        "(default: $LDM_MODEL, else the shipped model)",
    )
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle weights: .ckpt/.bin/.pt files, and "
                   "model folders, hub models or LoRAs with only .bin weights (torch.load weights_only)")
    g.add_argument("--model-config", metavar="FOLDER|NAME",
                   help="architecture of a single-file checkpoint: a diffusers folder or configs/models name "
                   "(default: from the file's metadata, else SD 1.x/2.x by its cross-attention width)")
    g.add_argument("--lora", action="append", default=[], help="LoRA weights (folder or .safetensors) from ldm train; repeatable")
    g.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA weights (default: 1; "
                   "txt2img/img2img --replay: the recorded one)")


# Defaults of the sampling options. The parser leaves them None, so that --replay can tell which ones were given
# (and refuse them: a replay uses the recorded settings); `apply_sampling_defaults` fills them in afterwards.
SAMPLING_DEFAULTS = {"negative_prompt": "", "guidance_rescale": 0.0, "eta": 0.0, "num_images": 1, "batch_size": 1,
                     "clip_skip": 1, "strength": 0.75, "resize_mode": "crop"}
# sampling options (dest → flag) that a replay takes from the image's record
RECORDED_OPTIONS = {"negative_prompt": "--negative-prompt", "steps": "--steps", "guidance_scale": "--guidance-scale",
                    "guidance_rescale": "--guidance-rescale", "guidance_cutoff": "--guidance-cutoff",
                    "scheduler": "--scheduler", "eta": "--eta",
                    "seed": "--seed", "num_images": "--num-images", "batch_size": "--batch-size", "height": "--height",
                    "width": "--width", "clip_skip": "--clip-skip", "init_image": "--init-image",
                    "strength": "--strength", "resize_mode": "--resize-mode", "original_size": "--original-size",
                    "target_size": "--target-size", "crop_top_left": "--crop-top-left"}


def apply_sampling_defaults(args: argparse.Namespace) -> None:
    for dest, value in SAMPLING_DEFAULTS.items():
        if hasattr(args, dest) and getattr(args, dest) is None:
            setattr(args, dest, value)


def image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (A1111's way of writing a size) → (height, width), diffusers' order."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 1024x768 (width x height)")
    return int(h), int(w)


def pair_of_ints(text: str) -> tuple[int, int]:
    """``A,B`` → (A, B), each a whole number >= 0."""
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not two whole numbers like 0,0")
    return int(parts[0]), int(parts[1])


def add_generation_args(p: argparse.ArgumentParser, img2img: bool = False) -> None:
    from ldm_pipeline.schedulers import ETA_SCHEDULERS, SCHEDULERS

    p.add_argument("prompt", nargs="*", help="text prompt(s); each makes --num-images images")
    p.add_argument("--from-file", metavar="FILE", help=".txt (one prompt per line) or .jsonl/.csv with per-row prompt, "
                   "negative_prompt, seed, steps, guidance_scale, guidance_rescale, guidance_cutoff, scheduler, eta, "
                   "width, height, clip_skip, num_images" + (", strength, init_image" if img2img else ""))
    p.add_argument("--replay", metavar="IMAGE.png", help="regenerate an image from the metadata it carries (sampling "
                   "options are taken from it; runtime and model options may be given)")
    add_model_args(p)
    p.set_defaults(lora_scale=None)  # None = not given: a replay then keeps the recorded scale
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--negative-prompt", help="what to steer away from")
    g.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    g.add_argument("--guidance-scale", "--cfg", type=float, help="classifier-free guidance scale; 1 skips the unconditional pass (default: the model's)")
    g.add_argument("--guidance-rescale", type=float, help="CFG rescale φ (Lin et al. 2023) in [0, 1] (default: 0 = off)")
    g.add_argument("--guidance-cutoff", type=float, metavar="FRACTION",
                   help="guidance only at timesteps >= FRACTION × the scheduler's training timesteps (1000 for SD): "
                   "the less noisy steps run the prompt alone, without the negative prompt or CFG rescale; in [0, 1], "
                   "0 = every step (default: the model's)")
    g.add_argument("--scheduler", choices=list(SCHEDULERS), metavar="NAME", help=f"sampler: {', '.join(SCHEDULERS)} (default: the model's)")
    g.add_argument("--eta", type=float, help=f"DDIM stochasticity η >= 0 (default: 0); only for --scheduler "
                   f"{'/'.join(ETA_SCHEDULERS)}")
    g.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i; -1 = random (default: "
                   "random, recorded)")
    g.add_argument("--num-images", type=int, help="images per prompt (default: 1)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (default: 1)")
    g.add_argument("--height", type=int, help="image height in pixels (default: the model's); txt2img: a multiple of 8 "
                   "and of the VAE factor, img2img: of the VAE factor")
    g.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    g.add_argument("--clip-skip", type=int, help="use the text encoder's N-th last layer (A1111 meaning: 1 = last, "
                   "2 = penultimate; default: 1)")
    g.add_argument("--original-size", type=image_size, metavar="WxH", help="SDXL: the size the model is told the "
                   "source image had (default: the output size); larger values steer away from upscaled-looking images")
    g.add_argument("--target-size", type=image_size, metavar="WxH", help="SDXL: the size the model is told to aim for "
                   "(default: the output size)")
    g.add_argument("--crop-top-left", type=pair_of_ints, metavar="TOP,LEFT", help="SDXL: the crop offset the model is "
                   "told of (default: 0,0; other values draw off-centre, as if cropped)")
    if img2img:
        g = p.add_argument_group("img2img")
        g.add_argument("--init-image", help="image file, folder or glob to edit")
        g.add_argument("--strength", type=float, help="how much to change the image, in (0, 1]; img2img runs "
                       "int(steps × strength) steps, which must be at least 1 (default: 0.75)")
        g.add_argument("--resize-mode", choices=["crop", "pad", "stretch"],
                       help="fitting the init image to the size (or to the VAE factor; default: crop)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="weights/activations precision (default fp32, with --fast the fastest native one; replay: the recorded one)")
    g.add_argument("--attention-slicing", action="store_true", help="diffusers attention slicing (less memory)")
    g.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    g.add_argument("--cpu-offload", action="store_true", help="model CPU offload (GPU memory saver; needs cuda)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the UNet")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first image)")
    g.add_argument("--fast", action="store_true", help="the speed-ups that measured best on this device and model "
                   "(CPU: bf16 + channels-last for SD-size models, torch.compile for small ones; CUDA: fp16, fused "
                   "QKV, compile with CUDA graphs); "
                   "--dtype overrides its precision; the first image pays the compilation (see docs/generating.md)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--outdir", default="outputs/img2img" if img2img else "outputs/txt2img", help="output folder")
    g.add_argument("--grid", action="store_true", help="also save a grid of all images")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
