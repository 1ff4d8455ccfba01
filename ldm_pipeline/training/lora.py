"""LoRA adapters with peft, attached and saved the way diffusers' examples/text_to_image/train_text_to_image_lora.py
does, so `StableDiffusionPipeline.load_lora_weights` (and `ldm txt2img --lora DIR`) reads what we write."""

from __future__ import annotations

from pathlib import Path

from ldm_pipeline.training.config import LoraSettings

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder


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


def save_lora(out_dir: str | Path, unet, text_encoder=None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (UNet and, if given, text-encoder adapters) into `out_dir`."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out_dir),
        unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None else None,
        safe_serialization=True,
    )
    return Path(out_dir) / WEIGHT_NAME
