"""Scheduler names → diffusers scheduler classes, one explicit table.

Names follow what users type (A1111 sampler names in lower-kebab form); each entry also carries the A1111
display name written into PNG metadata, so images read back in A1111's PNG Info tab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ldm_pipeline.errors import UserError


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str  # attribute of the diffusers package
    a1111_name: str  # "Sampler:" in the A1111 parameters text
    overrides: dict[str, Any] = field(default_factory=dict)  # config changes on top of the model's own


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddpm": SchedulerChoice("DDPMScheduler", "DDPM"),
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler-a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", "Heun"),
    "dpm++2m": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M", {"use_karras_sigmas": False}),
    "dpm++2m-karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpm++2m-sde": SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}
    ),
    "dpm++2m-sde-karras": SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M SDE Karras", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    ),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
}

# the ones whose step() uses `eta`: only DDIM (η=0 deterministic, η=1 DDPM-like). diffusers' DDPMScheduler.step
# takes no eta (the pipeline silently drops it), so `--eta` with ddpm is refused rather than recorded falsely.
ETA_SCHEDULERS = ("ddim",)


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def check_scheduler_name(name: str) -> str:
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")
    return name


# Zero terminal SNR (``rescale_betas_zero_snr``, Lin et al. 2023) makes the last training timestep pure noise:
# alphas_cumprod[-1] == 0, sigma_max = inf. diffusers' sigma-based schedulers (DPMSolverMultistep, Euler, UniPC, ...)
# replace that 0 with 2**-24 "so first sigma is not inf", which leaves sigma_max = 4096, an artefact of that stand-in
# and far above any sigma the model meaningfully denoises (t = 998 is already sigma 2254; 14.6 is SD's usual top).
# A Karras schedule runs from sigma_max to sigma_min with rho = 7, so from 4096 it spends most of its steps above
# sigma ~20 (10 steps: t = 999, 998, 997, 994, 986, 964, ...: a wrong image) and, from 21 steps here, its first two
# sigmas round to the same integer timestep: DPMSolverMultistepScheduler.index_for_timestep then starts at index 1
# and step() reads sigmas[N + 1] (IndexError). The Karras schedule's own top, EDM's sigma_max = 80 (Karras et al.
# 2022, table 1), stands in for infinity instead: diffusers' `_convert_to_karras` takes `config.sigma_max` when the
# config has one (it reaches a DPMSolverMultistepScheduler as a hidden config key, as a saved Euler config would).
# Starting at sigma 80 from pure noise leaves a signal share of 1/sqrt(1 + 80**2) = 1.2 % unmodelled.
ZERO_SNR_KARRAS_SIGMA_MAX = 80.0
# diffusers' own stand-in for alphas_cumprod == 0 (EulerDiscrete/DPMSolverMultistep/UniPC with rescale_betas_zero_snr)
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def is_zero_snr(config: dict[str, Any]) -> bool:
    """Whether a scheduler config is zero terminal SNR (its last timestep is pure noise)."""
    return bool(config.get("rescale_betas_zero_snr"))


def make_scheduler(name: str, base_config: dict[str, Any]):
    """Build scheduler `name` from a model's scheduler config (diffusers' ``Scheduler.from_config`` swap).

    On a zero-terminal-SNR config two diffusers defaults are adjusted (see ZERO_SNR_KARRAS_SIGMA_MAX):
    - Karras sigmas start at sigma_max 80, not at diffusers' 2**-24 stand-in for an infinite sigma (4096);
    - DDIMScheduler's alphas_cumprod[-1] becomes 2**-24 as in diffusers' other zero-SNR schedulers: with it 0, the
      first step at eta > 0 computes sqrt(1 - a_prev - std**2) where std**2 == 1 - a_prev up to rounding, which is
      NaN on about 70 % of step counts (diffusers issue #5969; --eta 1 --steps 25 wrote a black image).
    """
    import diffusers

    choice = SCHEDULERS[check_scheduler_name(name)]
    cls = getattr(diffusers, choice.class_name)
    config = dict(base_config)
    zero_snr = is_zero_snr(config)
    if zero_snr and choice.overrides.get("use_karras_sigmas") and config.get("sigma_max") is None:
        config["sigma_max"] = ZERO_SNR_KARRAS_SIGMA_MAX
    scheduler = cls.from_config(config, **choice.overrides)
    if zero_snr and isinstance(scheduler, diffusers.DDIMScheduler) and scheduler.alphas_cumprod[-1] == 0:
        scheduler.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
    return scheduler


def check_steps(name: str, scheduler, steps: int, img2img: bool = False) -> str | None:
    """What stops `scheduler` (built by `make_scheduler(name, ...)`) from running `steps` steps, or None.

    - More steps than the model's training timesteps: DDIM/DDPM raise ValueError, the others repeat timesteps.
    - txt2img only: diffusers' sigma schedulers (DPMSolverMultistep, Euler, UniPC, ...) find their first step with
      ``index_for_timestep``, which takes the *second* match of a repeated timestep (meant for img2img restarts):
      a schedule whose first two timesteps round to the same integer (Karras sigmas at many steps, zero-SNR tops)
      starts at index 1 and fails with IndexError on its last step (img2img calls ``set_begin_index`` instead)."""
    most = scheduler.config.num_train_timesteps
    if steps > most:
        return (f"scheduler {name} cannot run {steps} steps: this model has {most} timesteps; "
                f"use --steps {most} or fewer")
    if img2img or not hasattr(scheduler, "index_for_timestep"):
        return None

    def repeats_first(n: int) -> bool:
        scheduler.set_timesteps(n)
        ts = scheduler.timesteps
        return len(ts) > 1 and int(ts[0]) == int(ts[1])

    if not repeats_first(steps):
        return None
    first = int(scheduler.timesteps[0])
    works, fails = 1, steps  # bisect to a working count next to a failing one (set_timesteps is O(steps))
    while fails - works > 1:
        mid = (works + fails) // 2
        works, fails = (works, mid) if repeats_first(mid) else (mid, fails)
    other = f" or scheduler {name.removesuffix('-karras')}" if name.endswith("-karras") else ""
    return (f"scheduler {name} cannot run {steps} steps on this model: its first two steps round to the same timestep "
            f"({first}), which diffusers' {type(scheduler).__name__} cannot step through; use fewer steps "
            f"(--steps {works} works){other}")


def scheduler_from_config(config: dict[str, Any]):
    """Instantiate the scheduler a config dict names with ``_class_name`` (how diffusers stores it)."""
    import diffusers

    cfg = dict(config)
    cls_name = cfg.pop("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"unknown scheduler class {cls_name}")
    return cls.from_config(cfg)


def name_of(scheduler) -> str:
    """Our name for a scheduler instance (best match on class and Karras/SDE flags: the choice that pins the most of
    its config, so an SDE scheduler is dpm++2m-sde, not dpm++2m, whose table entry leaves algorithm_type open)."""
    cls = type(scheduler).__name__
    cfg = scheduler.config
    matches = [(len(choice.overrides), name) for name, choice in SCHEDULERS.items()
               if choice.class_name == cls
               and all(cfg.get(k) == v for k, v in choice.overrides.items() if k != "skip_prk_steps")]
    return max(matches, key=lambda m: m[0])[1] if matches else cls
