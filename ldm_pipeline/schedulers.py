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


def make_scheduler(name: str, base_config: dict[str, Any]):
    """Build scheduler `name` from a model's scheduler config (diffusers' ``Scheduler.from_config`` swap)."""
    import diffusers

    choice = SCHEDULERS[check_scheduler_name(name)]
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(dict(base_config), **choice.overrides)


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
    """Our name for a scheduler instance (best match on class and Karras/SDE flags)."""
    cls = type(scheduler).__name__
    cfg = scheduler.config
    for name, choice in SCHEDULERS.items():
        if choice.class_name == cls and all(cfg.get(k) == v for k, v in choice.overrides.items() if k != "skip_prk_steps"):
            return name
    return cls
