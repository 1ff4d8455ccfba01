"""LoRA adapters with peft, attached and saved the way diffusers' examples/text_to_image/train_text_to_image_lora.py
(and ``train_text_to_image_lora_sdxl.py``) does, so `StableDiffusionPipeline.load_lora_weights` (SDXL:
`StableDiffusionXLPipeline`'s, and `ldm txt2img --lora DIR`) reads what we write; a kohya-format copy beside it is
for A1111 and ComfyUI.

The file carries each adapter's rank and alpha in diffusers' ``lora_adapter_metadata`` (safetensors header): without
it `load_lora_weights` takes alpha = rank, i.e. scale 1, and an adapter trained with ``lora.alpha`` != rank loads
at the wrong strength (rank / alpha times too strong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_pipeline.training.config import LoraSettings

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for in a folder
# the same adapters in kohya's format, for A1111 / ComfyUI (diffusers' train_dreambooth_lora_sdxl.py's name for it;
# load_lora_weights(folder) still picks WEIGHT_NAME)
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
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


def save_lora(out_dir: str | Path, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (UNet and, if given, text-encoder adapters — SDXL's second text
    encoder's too —, each with its rank and alpha) into `out_dir`, and its kohya-format copy (`save_kohya`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    encoders = {k: v for k, v in encoders.items() if v is not None}
    kwargs = {}
    for name, model in encoders.items():
        kwargs[f"{name}_lora_layers"] = lora_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(model)
    pipeline_class = StableDiffusionXLPipeline if text_encoder_2 is not None or _is_xl_unet(unet) \
        else StableDiffusionPipeline
    pipeline_class.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=lora_state_dict(unet),
                                     unet_lora_adapter_metadata=adapter_metadata(unet), safe_serialization=True,
                                     **kwargs)
    save_kohya(Path(out_dir) / KOHYA_WEIGHT_NAME, {"unet": unet, **encoders})
    return Path(out_dir) / WEIGHT_NAME


def _is_xl_unet(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def kohya_state_dict(models: dict[str, Any]) -> dict[str, Any]:
    """The adapters of peft-wrapped models ({"unet": …, "text_encoder": …, "text_encoder_2": …}) in kohya's format,
    which A1111, ComfyUI and diffusers' `load_lora_weights` read: keys ``lora_unet_*``, ``lora_te1_*``/``lora_te2_*``
    (SDXL) or ``lora_te_*`` (SD 1.x/2.x), each module's ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.
    UNet modules keep diffusers' names (``lora_unet_down_blocks_1_attentions_0_…``), as diffusers'
    `convert_state_dict_to_kohya` writes them; the alpha is the adapter's (that helper would write the rank)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    xl = "text_encoder_2" in models or _is_xl_unet(models["unet"])
    out: dict[str, Any] = {}
    for prefix, model in models.items():
        peft_sd = {f"{prefix}.{_clip_key(k) if prefix != 'unet' else k}": v
                   for k, v in get_peft_model_state_dict(model).items()}
        alpha = float(model.peft_config["default"].lora_alpha)
        for key, value in convert_state_dict_to_kohya(peft_sd).items():
            if key.endswith(".alpha"):
                value = torch.tensor(alpha)
            if not xl and key.startswith("lora_te1_"):  # kohya's name for SD 1.x/2.x's only text encoder
                key = "lora_te_" + key[len("lora_te1_"):]
            out[key] = value.contiguous()
    return out


def _clip_key(key: str) -> str:
    """A CLIP text encoder's module path as checkpoints spell it (``text_model.encoder.layers.N…``): transformers
    5's CLIPTextModel has no ``text_model`` level, CLIPTextModelWithProjection (and transformers 4's) does."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def save_kohya(path: Path, models: dict[str, Any]) -> Path:
    """`kohya_state_dict` of `models` as a safetensors file with kohya's ``ss_*`` metadata (A1111 reads the base model
    version from it to list the LoRA under SDXL or SD 1.x models)."""
    from safetensors.torch import save_file

    unet = models["unet"]
    config = unet.peft_config["default"]
    if "text_encoder_2" in models or _is_xl_unet(unet):
        base = "sdxl_base_v1-0"
    else:
        base = "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(float(config.lora_alpha)), "ss_base_model_version": base,
                "ss_v2": str(base == "sd_v2")}
    save_file(kohya_state_dict(models), str(path), metadata=metadata)
    return path
