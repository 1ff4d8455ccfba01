"""How a run maps onto accelerate: the mixed-precision choice, and what the loop supports under FSDP and DeepSpeed.

Pure functions of the config and accelerate's settings, so they are tested without GPUs or the deepspeed package.

* DeepSpeed (ZeRO stage 1/2): one model per Accelerator, so the text encoder cannot be trained alongside the UNet;
  ``train_micro_batch_size_per_gpu: auto`` is filled with our batch size before ``prepare`` (accelerate derives it
  only from a prepared DataLoader, and ours is not one). DeepSpeed steps the optimizer inside
  ``accelerator.backward``, so a NaN/inf loss is counted and the step is not counted, but the weight update is
  DeepSpeed's business: its fp16 loss scaler skips overflowing steps itself; with bf16/fp32 it does not.
  ZeRO stage 3 shards the parameters and is refused (EMA, validation and saving read them whole).
* FSDP: parameters are sharded across processes. EMA, validation samples, per-checkpoint pipelines, text-encoder
  and LoRA training read or save them whole and are refused at startup; the final model is saved from a gathered
  full state dict (``accelerator.get_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.training.config import TrainConfig, is_lora

MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch --mixed_precision` / accelerate config


def resolve_mixed_precision(setting: str, env: Mapping[str, str], cuda: bool) -> str:
    """The precision to hand to `Accelerator`: an explicit setting wins; ``auto`` takes accelerate's launcher
    setting (the environment) when there is one, else fp16 on CUDA and no precision change on CPU."""
    source = "mixed_precision"
    mp = setting
    if setting == "auto":
        from_env = env.get(MIXED_PRECISION_ENV, "").strip().lower()
        if from_env:
            mp, source = from_env, f"{MIXED_PRECISION_ENV}={from_env} (from accelerate launch or accelerate config)"
        else:
            mp = "fp16" if cuda else "no"
    if mp not in ("no", "fp16", "bf16"):
        raise UserError(f"{source}: ldm train supports mixed precision no, fp16 or bf16")
    if mp == "fp16" and not cuda:
        raise UserError(f"{source}: fp16 mixed precision needs a CUDA GPU; use bf16 or no on CPU")
    return mp


def trains_text_encoder(config: TrainConfig) -> bool:
    """Whether the text encoder gets gradients (fully, or through LoRA adapters)."""
    return config.train_text_encoder or config.lora.text_encoder


def check_backend(config: TrainConfig, distributed_type: str, deepspeed_config: Mapping[str, Any] | None = None) -> None:
    """UserError, before any model is prepared, for combinations the loop cannot run correctly.

    `distributed_type` is ``str(accelerator.distributed_type)`` (``DistributedType.FSDP`` or ``FSDP``, …);
    `deepspeed_config` accelerate's ``deepspeed_plugin.deepspeed_config`` under DeepSpeed.
    """
    kind = distributed_type.rsplit(".", 1)[-1].upper()
    if kind == "DEEPSPEED":
        stage = int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)
        if stage >= 3:
            raise UserError("DeepSpeed ZeRO stage 3 shards the parameters, which EMA, validation and saving read "
                            "whole: use stage 2 (configs/accelerate/deepspeed_zero2.yaml)")
        if trains_text_encoder(config):
            raise UserError("under DeepSpeed accelerate prepares one model per run, and training the text encoder "
                            "makes two: set train_text_encoder=false (and lora.text_encoder=false), or use DDP "
                            "(configs/accelerate/multi_gpu.yaml)")
    elif kind == "FSDP":
        fixes = []
        if config.ema.enabled:
            fixes.append("ema.enabled=false")
        if config.validate_every:
            fixes.append("validate_every=0")
        if config.checkpoint_pipeline:
            fixes.append("checkpoint_pipeline=false")
        if trains_text_encoder(config):
            fixes.append("train_text_encoder=false lora.text_encoder=false")
        if is_lora(config):
            fixes.append("lora.rank=0")
        if fixes:
            raise UserError("under FSDP the UNet's parameters are sharded across processes, and EMA, validation "
                            "samples, per-checkpoint pipelines, text-encoder and LoRA training need them whole: set "
                            f"{' '.join(fixes)} (or use DDP: configs/accelerate/multi_gpu.yaml)")


def fill_deepspeed_config(deepspeed_config: dict[str, Any], batch_size: int) -> list[str]:
    """Set ``train_micro_batch_size_per_gpu`` to our per-process batch size when the DeepSpeed config leaves it
    ``auto`` (or out), refuse a different number; call before ``accelerator.prepare``. Returns the keys it set."""
    value = deepspeed_config.get("train_micro_batch_size_per_gpu", "auto")
    if value == "auto":
        deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return ["train_micro_batch_size_per_gpu"]
    if int(value) != batch_size:
        raise UserError(f"the DeepSpeed config's train_micro_batch_size_per_gpu ({value}) differs from batch_size "
                        f"({batch_size}): set it to auto, or make them equal")
    return []
