"""SDXL conditioning for training, as diffusers' ``train_text_to_image_sdxl.py`` and kohya's ``sdxl_train.py`` build it.

An SDXL UNet takes, besides the noisy latents and the timestep:

* ``encoder_hidden_states``: both text encoders' penultimate hidden states, concatenated ([B, 77, D1+D2]);
* ``added_cond_kwargs["text_embeds"]``: the second encoder's projected pooled embedding ([B, P]);
* ``added_cond_kwargs["time_ids"]``: six numbers per sample, (original_h, original_w, crop_top, crop_left,
  target_h, target_w): the image's size before resizing, the corner of the crop in the resized (and, when flipped,
  mirrored) image, and the size trained on (the batch's pixel size, i.e. its bucket).

The text part comes from `ldm_pipeline.prompts.encode_xl_tokens` (what generation uses too), or from the latent cache.
"""

from __future__ import annotations

from typing import Any


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel along a side (8 for SD/SDXL's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_encode_dtype(vae, weight_dtype, xl: bool):
    """The dtype the VAE encodes training images in: fp32 for an SDXL VAE marked ``force_upcast`` (SDXL's own, which
    overflows to NaN in fp16) under fp16 mixed precision, as diffusers' SDXL scripts keep it unless a fixed VAE is
    given; otherwise the mixed-precision dtype (bf16's range does not overflow; SD 1.x/2.x runs are unchanged)."""
    import torch

    if xl and weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return weight_dtype


def add_time_ids(original_sizes, crop_top_lefts, target_size: tuple[int, int], device=None):
    """SDXL's size and crop micro-conditioning, one row per sample: (original_h, original_w, crop_top, crop_left,
    target_h, target_w) as float32 [B, 6] (diffusers' ``compute_time_ids``; float32 keeps sizes above 2048 exact)."""
    import torch

    original = torch.as_tensor(original_sizes, dtype=torch.float32).reshape(-1, 2)
    crops = torch.as_tensor(crop_top_lefts, dtype=torch.float32).reshape(-1, 2)
    target = torch.tensor([list(target_size)], dtype=torch.float32).expand(original.shape[0], 2)
    return torch.cat([original, crops, target], dim=1).to(device)


def encode_text(run, batch) -> tuple[Any, Any]:
    """(prompt_embeds [B, 77, D1+D2], pooled [B, P]) of the batch: the cached ones, or both text encoders' (with
    gradients when they are trained)."""
    import contextlib

    import torch

    from ldm_pipeline.prompts import encode_xl_tokens

    device = run.accelerator.device
    if "prompt_embeds" in batch:
        return (batch["prompt_embeds"].to(device, run.weight_dtype),
                batch["pooled_prompt_embeds"].to(device, run.weight_dtype))
    ids = [batch["input_ids"].to(device), batch["input_ids_2"].to(device)]
    with contextlib.nullcontext() if run.train_te else torch.no_grad():
        return encode_xl_tokens([run.text_encoder, run.text_encoder_2], ids)


def unet_conditioning(run, batch, latents) -> tuple[Any, dict[str, Any]]:
    """(encoder_hidden_states, added_cond_kwargs) for an SDXL UNet; the target size is the batch's pixel size (its
    bucket), read off the latents so cached batches need no pixels."""
    hidden, pooled = encode_text(run, batch)
    factor = vae_scale_factor(run.vae)
    target = (latents.shape[-2] * factor, latents.shape[-1] * factor)
    time_ids = add_time_ids(batch["original_sizes"], batch["crop_top_lefts"], target, latents.device)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}


def freeze_unused_text_encoder_layers(text_encoder) -> list[str]:
    """Freeze what SDXL's conditioning never reads of the first text encoder: its last layer and final layer norm
    (the hidden states are the penultimate layer's; its pooled output is unused). They get no gradient, which DDP
    refuses, and AdamW's weight decay would still shrink them; kohya's sdxl_train.py freezes them too. Returns the
    names of the frozen trainable parameters (LoRA adapters on that layer included)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    frozen = []
    for prefix, module in (("encoder.layers.-1", inner.encoder.layers[-1]), ("final_layer_norm", inner.final_layer_norm)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{prefix}.{name}")
    return frozen
