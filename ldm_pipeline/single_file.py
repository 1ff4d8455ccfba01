"""Single-file checkpoints (one ``.safetensors``, or ``.ckpt`` with --allow-pickle) in the original key layout:
SD 1.x/2.x (CompVis ``model.diffusion_model.*`` + ``cond_stage_model.*``) and SDXL (SGM, with
``conditioner.embedders.{0,1}.*``), loaded through diffusers' ``from_single_file``.

diffusers fetches the architecture of a single file from the hub; this world may have none, so the architecture
comes from a weightless config folder written here: from ``configs/models/<arch>.yaml`` (the arch detected from the
file's keys), or from the configs ``ldm export`` records in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.files import CACHE_DIR, make_temp_dir
from ldm_pipeline.model_spec import GenerationDefaults, load_model_spec, write_defaults
from ldm_pipeline.tokenizer import load_tokenizer

# keys that tell the architectures apart (diffusers' CHECKPOINT_KEY_NAMES has the same ones)
SD_ATTENTION_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"  # OpenCLIP bigG: SDXL base
XL_PAD_TOKENIZER = "clip-vit-large-patch14-pad0"  # SDXL's second tokenizer (OpenCLIP) pads with "!" (id 0)


def _read_keys(path: Path) -> tuple[set[str], Any]:
    """The tensor names of a checkpoint and a function giving a tensor's shape by name."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return set(shapes), shapes.__getitem__
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read {path} (weights_only=True): {str(e).splitlines()[0][:200]}") from None
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds no state dict")
    return set(sd), lambda k: tuple(sd[k].shape)


def detect_single_file_arch(path: Path, allow_pickle: bool = False) -> str:
    """'sdxl' (an OpenCLIP-bigG second text encoder), else 'sd15' or 'sd21' from the cross-attention width (768: SD
    1.x, 1024: SD 2.x)."""
    keys, shape = _read_keys(path)
    if SDXL_KEY in keys:
        return "sdxl"
    if SD_ATTENTION_KEY not in keys:
        raise UserError(f"{path} is not a Stable Diffusion 1.x/2.x/XL checkpoint in the original (CompVis/SGM) key "
                        "layout")
    width = shape(SD_ATTENTION_KEY)[1]
    arch = {768: "sd15", 1024: "sd21"}.get(int(width))
    if arch is None:
        raise UserError(f"{path}: cross-attention width {width} is neither SD 1.x (768) nor SD 2.x (1024)")
    return arch


def config_folder_for(path: Path, allow_pickle: bool, model_config: str | None) -> Path:
    """The weightless config folder giving `path`'s architecture: `model_config` (a diffusers folder or a
    configs/models name) if given, else what ``ldm export`` recorded in the file, else detected from its keys."""
    if model_config is not None:
        return Path(model_config) if Path(model_config).is_dir() else offline_config_folder(model_config)
    if path.suffix.lower() == ".safetensors" and (config := config_folder_from_metadata(path)) is not None:
        return config
    return offline_config_folder(detect_single_file_arch(path, allow_pickle))


def offline_config_folder(arch: str) -> Path:
    """A weightless diffusers folder (configs + tokenizers) for `arch`, so single-file loading needs no hub."""
    out = CACHE_DIR / "single_file_configs" / arch
    if (out / "model_index.json").is_file():
        return out
    spec = load_model_spec(arch)
    configs = {"unet": spec.unet, "vae": spec.vae, "text_encoder": spec.text_encoder, "scheduler": spec.scheduler}
    tokenizers = {"tokenizer": spec.tokenizer}
    if spec.text_encoder_2 is not None:
        configs["text_encoder_2"] = spec.text_encoder_2
        tokenizers["tokenizer_2"] = spec.tokenizer_2 or XL_PAD_TOKENIZER
    return write_config_folder(out, configs, tokenizers, spec.defaults)


def config_folder_from_metadata(path: Path) -> Path | None:
    """For a file written by ``ldm export``: its architecture, from the configs it records in its metadata."""
    from safetensors import safe_open

    from ldm_pipeline.config import from_dict

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not our concern here: the loader reports unreadable files
        return None
    if "ldm_pipeline.config" not in meta:
        return None
    configs = json.loads(meta["ldm_pipeline.config"])
    digest = hashlib.sha256(meta["ldm_pipeline.config"].encode()).hexdigest()[:16]
    out = CACHE_DIR / "single_file_configs" / f"meta-{digest}"
    if (out / "model_index.json").is_file():
        return out
    te = configs["text_encoder"]
    tokenizers = {"tokenizer": XL_PAD_TOKENIZER if te.get("pad_token_id") == 0 else "clip-vit-large-patch14"}
    if "text_encoder_2" in configs:
        tokenizers["tokenizer_2"] = XL_PAD_TOKENIZER
    defaults = from_dict(GenerationDefaults, json.loads(meta.get("ldm_pipeline.defaults", "{}")))
    return write_config_folder(out, configs, tokenizers, defaults)


def write_config_folder(out: Path, configs: dict[str, dict], tokenizers: dict[str, str], defaults) -> Path:
    """A diffusers folder without weights: each component's config (unet, vae, text_encoder[, text_encoder_2],
    scheduler), the tokenizers, model_index.json and our generation defaults."""
    xl = "text_encoder_2" in configs
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}-")
    for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps({"_class_name": cls, **configs[name]}, indent=2))
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
    }
    encoders = [("text_encoder", "CLIPTextModel", "tokenizer")]
    if xl:
        encoders.append(("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"))
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    for name, cls, tok in encoders:
        (tmp / name).mkdir()
        te = {"architectures": [cls], "model_type": "clip_text_model", **configs[name]}
        (tmp / name / "config.json").write_text(json.dumps(te, indent=2))
        load_tokenizer(tokenizers[tok]).save_pretrained(tmp / tok)
        index[name] = ["transformers", cls]
        index[tok] = ["transformers", "CLIPTokenizer"]
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    write_defaults(tmp, defaults)
    _rename_into_place(tmp, out)
    return out


def _rename_into_place(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():  # another process won the race with identical content
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
