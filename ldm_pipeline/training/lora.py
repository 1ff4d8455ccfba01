"""LoRA adapters with peft, attached and saved the way diffusers' examples/text_to_image/train_text_to_image_lora.py
does, so `StableDiffusionPipeline.load_lora_weights` (and `ldm txt2img --lora DIR`) reads what we write.

The file carries each adapter's rank and alpha in diffusers' ``lora_adapter_metadata`` (safetensors header): without
it `load_lora_weights` takes alpha = rank, i.e. scale 1, and an adapter trained with ``lora.alpha`` != rank loads
at the wrong strength (rank / alpha times too strong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_pipeline.training.config import LoraSettings

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
# LoraConfig fields diffusers needs to rebuild the adapter (what its own get_peft_kwargs derives from a state dict).
# Not peft's whole to_dict(), as diffusers' scripts write: a file would then name fields that an older peft's
# LoraConfig rejects ("LoraConfig class could not be instantiated") although nothing in it needs them.
METADATA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")


def add_unet_lora(unet, settings: LoraSettings) -> None:
    """Freeze the UNet and attach trainable adapters to its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                lora_dropout=settings.dropout, init_lora_weights="gaussian",
                                target_modules=list(settings.unet_target_modules)))


def add_text_encoder_lora(text_encoder, settings: LoraSettings) -> None:
    """Freeze the CLIP text encoder and attach trainable adapters to its attention projections."""
    from peft import LoraConfig

    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                        lora_dropout=settings.dropout, init_lora_weights="gaussian",
                                        target_modules=list(settings.text_encoder_target_modules)))


def lora_state_dict(model) -> dict:
    """The adapter weights of a peft-wrapped model, with diffusers' key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def adapter_metadata(model) -> dict[str, Any]:
    """The rank, alpha and targets of a peft-wrapped model's adapter, as diffusers' ``*_lora_adapter_metadata``."""
    config = model.peft_config["default"].to_dict()
    meta = {k: config[k] for k in METADATA_KEYS if k in config}
    if isinstance(meta.get("target_modules"), (set, list, tuple)):
        meta["target_modules"] = sorted(meta["target_modules"])  # a set is not JSON (and would be unordered)
    return meta


def save_lora(out_dir: str | Path, unet, text_encoder=None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (UNet and, if given, text-encoder adapters, each with its rank and
    alpha) into `out_dir`."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out_dir),
        unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if text_encoder is not None else None,
        safe_serialization=True,
    )
    return Path(out_dir) / WEIGHT_NAME
