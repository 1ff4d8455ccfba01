"""What to generate and how to run it: `Job` (one image's settings), `RuntimeOptions` (device, precision, memory
switches, LoRAs) and the rules every setting is checked by, shared by the command-line flags, prompt-file rows and
the Python API."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.schedulers import ETA_SCHEDULERS

RESIZE_MODES = ("crop", "pad", "stretch")
DTYPES = ("fp32", "fp16", "bf16")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes; seeds wrap around past it
RANDOM_SEED_MAX = 2**32 - 1  # random seeds are drawn below this (A1111's range: short file names)
RANDOM = -1  # --seed -1 / "seed": -1 means "draw one" (the A1111 convention)
DIFFUSERS_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs wants height and width divisible by 8

@dataclass
class Job:
    """One image to make. Fields left None take the run's settings, then the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    guidance_cutoff: float | None = None  # CFG only at timesteps >= this fraction of the schedule (0 = every step)
    scheduler: str | None = None
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    clip_skip: int = 1
    # SDXL's micro-conditioning, (height, width) / (top, left) as diffusers takes them; None = diffusers' defaults
    # (the image's own size, no crop). SD 1.x/2.x models have none.
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    # img2img only
    init_image: str | None = None
    strength: float | None = None
    resize_mode: str = "crop"
    index: int = 0  # position in the run (decides the output number)


@dataclass
class RuntimeOptions:
    """How to run (not what to draw): device, precision and diffusers' memory/speed switches."""

    device: str = "auto"
    dtype: str = "fp32"  # fp32, fp16, bf16, or auto: fp32, or with `fast` the precision that pays on the device
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    channels_last: bool = False
    compile: bool = False
    fast: bool = False  # the speed-ups that measured best on the device (ldm_pipeline.fast)
    allow_pickle: bool = False
    model_config: str | None = None  # architecture of a single-file checkpoint (folder or configs/models name)
    lora: list[str] = field(default_factory=list)
    lora_scale: float = 1.0


def resolve_device(name: str) -> str:
    """``auto`` → the best device here; anything else is checked to exist (a one-line UserError, not a traceback
    from ``pipe.to``)."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(f"unknown --device {name}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    if kind == "mps" and not mps:
        raise UserError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    return name


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise UserError(f"unknown --dtype {name}: use fp32, fp16 or bf16") from None


def random_seed() -> int:
    return random.SystemRandom().randint(0, RANDOM_SEED_MAX)


def wrap_seed(seed: int) -> int:
    """seed + i past MAX_SEED wraps to 0, so every image of a run has a seed torch accepts."""
    return seed % (MAX_SEED + 1)


def check_setting(name: str, value: Any) -> str | None:
    """What is wrong with one generation setting, or None: the single rule set behind the command-line flags,
    prompt-file rows and `Generator.resolve` (callers add the flag name or the file line)."""
    if value is None:
        return None
    if name in ("num_inference_steps", "num_images", "batch_size", "clip_skip") and value < 1:
        return f"must be at least 1 (got {value})"
    if name in ("height", "width") and value <= 0:
        return f"must be positive (got {value})"
    if name == "guidance_scale" and value < 0:
        return f"must be >= 0 (got {value})"
    if name in ("guidance_rescale", "guidance_cutoff") and not 0 <= value <= 1:
        return f"must be in [0, 1] (got {value})"
    if name == "eta" and not 0 <= value <= 1:  # DDIM's sigma formula goes NaN past 1 (as A1111, 0..1)
        return f"must be in [0, 1] (got {value})"
    if name == "strength" and not 0 < value <= 1:
        return f"must be in (0, 1] (got {value})"
    if name == "seed" and value != RANDOM and not 0 <= value <= MAX_SEED:
        return f"must be {RANDOM} (random) or 0..{MAX_SEED} (got {value})"
    if name == "resize_mode" and value not in RESIZE_MODES:
        return f"must be one of {', '.join(RESIZE_MODES)} (got {value})"
    return None


def check_eta(eta: float | None, scheduler: str | None) -> str | None:
    """--eta only means something to DDIM (diffusers' other schedulers, DDPM included, ignore it)."""
    if eta and scheduler is not None and scheduler not in ETA_SCHEDULERS:
        return f"--eta applies to the {' and '.join(ETA_SCHEDULERS)} scheduler only, not {scheduler}"
    return None


def img2img_step_count(steps: int, strength: float) -> int:
    """Denoising steps diffusers' img2img runs: ``int(steps * strength)`` (its ``get_timesteps``)."""
    return min(int(steps * strength), steps)


def check_img2img_steps(steps: int, strength: float) -> str | None:
    """img2img with ``int(steps * strength) == 0`` would run no step at all (diffusers then fails with a
    RuntimeError): say which values work instead of silently changing the strength."""
    if img2img_step_count(steps, strength) >= 1:
        return None
    more = math.ceil(1 / strength)
    while img2img_step_count(more, strength) < 1:
        more += 1
    return (f"strength {strength:g} × {steps} steps leaves no denoising step (img2img runs int(steps × strength) "
            f"steps): use --strength {1 / steps:g} or more, or --steps {more} or more")



def jobs_from_api(prompt: str | list[str], settings: dict[str, Any]) -> list[Job]:
    """The Python API's prompt(s) and settings as Jobs: ``num_images`` per prompt, image i with seed + i."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    settings = dict(settings)
    num = settings.pop("num_images", 1)
    settings.pop("batch_size", None)
    seed = settings.pop("seed", None)
    for name, value in (("num_images", num), ("seed", seed)):
        if problem := check_setting(name, value):
            raise UserError(f"{name} {problem}")
    if seed is None or seed == RANDOM:
        seed = random_seed()
    jobs = []
    for p in prompts:
        for _ in range(num):
            jobs.append(Job(prompt=p, seed=wrap_seed(seed + len(jobs)), index=len(jobs), **settings))
    return jobs
