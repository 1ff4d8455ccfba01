"""What a run shows while it trains: sample grids drawn through `ldm txt2img`'s own Generator, and a loss curve.

Validation images use fixed seeds (image i: ``validation.seed + i``) so grids from different steps are comparable,
and run inside ``torch.random.fork_rng`` so sampling never disturbs the training RNG (exact resume depends on it).
"""

from __future__ import annotations

import math
from pathlib import Path

from ldm_pipeline.training.config import GENERIC_VALIDATION_PROMPTS, ValidationSettings


def resolve_settings(settings: ValidationSettings, defaults) -> ValidationSettings:
    """`settings` with each field left None taken from the model's `GenerationDefaults`: prompts given in the config
    win, else the model's example prompts, else GENERIC_VALIDATION_PROMPTS; size, steps, guidance and sampler are
    what `ldm txt2img` would use for the model."""
    import dataclasses

    def pick(value, default):
        return default if value is None else value

    prompts = settings.prompts
    if prompts is None:
        prompts = list(defaults.example_prompts or GENERIC_VALIDATION_PROMPTS)
    return dataclasses.replace(
        settings, prompts=list(prompts),
        num_inference_steps=pick(settings.num_inference_steps, defaults.num_inference_steps),
        guidance_scale=pick(settings.guidance_scale, defaults.guidance_scale),
        scheduler=pick(settings.scheduler, defaults.scheduler),
        height=pick(settings.height, defaults.height), width=pick(settings.width, defaults.width))


def live_pipeline(components: dict, device) -> object:
    """A pipeline around the training modules themselves (sharing their weights, in their training dtypes), each on
    the training `device` (an SDXL pipeline when `components` has text_encoder_2 and tokenizer_2). Sample from it under ``accelerator.autocast()``: under mixed precision the frozen VAE and
    text encoder are fp16/bf16 while the trained UNet is fp32, and the fp32 copies kept for saving stay on the CPU."""
    import torch

    from ldm_pipeline.models import pipeline_from_components

    device = torch.device(device)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = components.get(name)
        if module is None:  # text_encoder_2: SDXL only
            continue
        param = next(module.parameters(), None)
        if param is not None and (param.device.type, param.device.index or 0) != (device.type, device.index or 0):
            module.to(device)
    return pipeline_from_components(components)


def sample_images(pipe, info, settings: ValidationSettings, height: int, width: int, device: str) -> list:
    """One image per prompt through `ldm_pipeline.generator.ImageGenerator` (the `ldm txt2img` path); `settings` resolved
    (`resolve_settings`), so only the guidance cut-off comes from the model's defaults here."""
    import torch

    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import Job, RuntimeOptions

    gen = Generator(pipe, info, RuntimeOptions(device=device), device)
    jobs = [Job(prompt=p, seed=settings.seed + i, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, scheduler=settings.scheduler, height=height, width=width,
                index=i) for i, p in enumerate(settings.prompts)]
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return [r.image for r in gen.generate(jobs)]


def grid_image(images: list, prompts: list[str]):
    """The validation grid: the prompt written under each image."""
    from ldm_pipeline.grid import make_grid

    return make_grid(images, prompts)


def save_samples(images: list, prompts: list[str], out_dir: Path, step: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step-{step:07d}.png"
    grid_image(images, prompts).save(path)
    return path


def log_grid(accelerator, grid, step: int) -> None:
    """Send a grid to the trackers that take images (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid)]}, step=step)


def draw_loss_curve(steps: list[int], losses: list[float], path: Path, width: int = 800, height: int = 400) -> Path:
    """Loss against step as a PNG, drawn with PIL (raw loss in grey, a smoothed line in blue, log-free axes)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), "training loss", fill="black")
    pts = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if pts:
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        hi = hi if hi > lo else lo + 1e-6

        def xy(s: float, v: float) -> tuple[float, float]:
            return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

        if len(pts) > 1:
            d.line([xy(s, v) for s, v in pts], fill=(170, 170, 170), width=1)
            alpha = 2 / (1 + min(50, max(2, len(pts) // 10)))
            smooth, acc = [], pts[0][1]
            for s, v in pts:
                acc = alpha * v + (1 - alpha) * acc
                smooth.append(xy(s, acc))
            d.line(smooth, fill=(31, 119, 180), width=2)
        else:
            x, y = xy(*pts[0])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
        for v in (lo, (lo + hi) / 2, hi):
            _, y = xy(s0, v)
            d.text((4, y - 6), f"{v:.4g}", fill="black")
        d.text((left, bottom + 8), str(s0), fill="black")
        d.text((right - 40, bottom + 8), str(s1), fill="black")
        d.text(((left + right) // 2 - 15, bottom + 22), "step", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
