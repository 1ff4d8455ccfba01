"""Write a diffusers Stable Diffusion model as one ``.safetensors`` file in the original key layout: CompVis/LDM
for SD 1.x/2.x (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), SGM for SDXL (the
same UNet/VAE names, text encoders under ``conditioner.embedders.{0,1}.*``): the layout of the original checkpoints,
which A1111, ComfyUI and diffusers' ``from_single_file`` read.

The mapping is the inverse of diffusers' own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint`` in
``diffusers/loaders/single_file_utils.py``), written generically for any ``block_out_channels`` /
``layers_per_block`` / ``transformer_layers_per_block``. Every export is checked by running those forward
converters on the result: each diffusers parameter must come back under its own name, bit for bit, or nothing is
written.

Text encoders: OpenAI CLIP (SD 1.x) goes to ``cond_stage_model.transformer.text_model.*``; a 1024-wide encoder
(SD 2.x) goes to OpenCLIP's ``cond_stage_model.model.*`` (q/k/v fused into ``in_proj``). The SD 2.x file has the
23 layers the diffusers model has; the original's unused 24th layer and ``text_projection`` are not invented.
SDXL: CLIP-L goes to ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP bigG (transformers'
CLIPTextModelWithProjection) to ``conditioner.embedders.1.model.*`` with ``text_projection`` stored transposed
(open_clip computes ``x @ text_projection``). Released SDXL files (sd_xl_base_1.0) also hold CLIP-L's
``position_ids`` buffer (arange(77)) and bigG's ``logit_scale`` (CLIP's training temperature), which diffusers
ignores and A1111/ComfyUI load non-strictly, keeping their own defaults; neither affects generation, so neither is
invented (a few community "fix SDXL CLIP" scripts flag their absence).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.files import atomic_file

# Written here because diffusers installs only LDM → diffusers; its reverse is a repo script pip does not install.

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # + text_model.* (SD 1.x, OpenAI CLIP in transformers' naming)
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x, open_clip naming
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP-L, + text_model.*
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG, open_clip naming
XL_LAYOUT = "sdxl"  # ExportResult.text_encoder_layout of an SDXL file: CLIP-L + OpenCLIP bigG, fixed
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TEXT_ENCODER_LAYOUTS = ("auto", "clip", "openclip")
FORMAT = "ldm-single-file"  # our metadata value: CompVis/LDM key layout, one file

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_ADD_EMBEDDING = {  # SDXL's pooled-text + size/crop embedding (addition_embed_type: text_time)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _split(name: str) -> tuple[str, str]:
    """'a.b.weight' → ('a.b', 'weight')."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _unsupported(part: str, key: str) -> UserError:
    return UserError(f"cannot export {part} parameter '{key}': the original SD single-file layout has no place for it")


def _layers_per_block(config: Mapping[str, Any], part: str) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise UserError(f"cannot export a {part} with per-block layers_per_block {list(lpb)}: the LDM layout "
                            "(and diffusers' loader) assumes one number")
        lpb = lpb[0]
    return int(lpb)


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel state dict → ``model.diffusion_model.*`` (inverse of convert_ldm_unet_checkpoint).

    LDM numbers its blocks flat: ``input_blocks.0`` is conv_in, then each down block contributes
    ``layers_per_block`` (resnet, attention) slots plus one downsampler slot (all but the last block);
    ``output_blocks`` has ``layers_per_block + 1`` slots per up block, the upsampler sharing the last slot after
    the attention (index 2) or the resnet (index 1). proj_in/proj_out keep their shape: 1x1 conv for SD 1.x
    (``use_linear_projection: false``), linear for SD 2.x/XL, the same as the originals. An attention's
    ``transformer_blocks.N`` keep their names (SDXL's 2 and 10 per block included); SDXL's ``add_embedding`` is
    ``label_emb.0``, which diffusers reads only for ``addition_embed_type: text_time``.
    """
    per = _layers_per_block(config, "UNet") + 1
    up_with_attention = {int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    top = {**_UNET_TOP, **(_UNET_ADD_EMBEDDING if config.get("addition_embed_type") == "text_time" else {})}
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        module, leaf = _split(key)
        if module in top:
            new = f"{top[module]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            b, i, sub, leaf = int(m[1]), int(m[2]), m[3], m[4]
            new = f"input_blocks.{1 + b * per + i}.0.{_UNET_RESNET[sub]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1]) + 1}.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_UNET_RESNET[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in up_with_attention else 1}.conv.{m[2]}"
        else:
            raise _unsupported("UNet", key)
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL state dict → ``first_stage_model.*`` (inverse of convert_ldm_vae_checkpoint).

    The decoder's up blocks are numbered in reverse (LDM's ``up.0`` is the full-resolution one); the mid-block
    attention's linear q/k/v/proj_out become the 1x1 convs ([C, C, 1, 1]) of the original AttnBlock.
    """
    n_up = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        module, leaf = _split(key)
        if module in _VAE_TOP:
            new = f"{_VAE_TOP[module]}.{leaf}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3], key)}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3], key)}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
            if m[2] not in _VAE_ATTN:
                raise _unsupported("VAE", key)
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # linear → 1x1 conv
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3], key)}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise _unsupported("VAE", key)
        out[VAE_PREFIX + new] = tensor
    return out


def _vae_resnet(sub: str, key: str) -> str:
    if sub in ("norm1", "conv1", "norm2", "conv2"):
        return sub
    if sub == "conv_shortcut":
        return "nin_shortcut"
    raise _unsupported("VAE", key)


def resolve_text_encoder_layout(hidden_size: int, layout: str = "auto") -> str:
    """'clip' (SD 1.x) or 'openclip' (SD 2.x): `layout`, or by width when 'auto' (1024 is SD 2.x's OpenCLIP-H)."""
    if layout not in TEXT_ENCODER_LAYOUTS:
        raise UserError(f"text encoder layout '{layout}': expected one of {', '.join(TEXT_ENCODER_LAYOUTS)}")
    if layout != "auto":
        return layout
    return "openclip" if int(hidden_size) == 1024 else "clip"


def text_encoder_to_ldm(state_dict: Mapping[str, Any], layout: str = "clip", prefix: str | None = None
                        ) -> dict[str, Any]:
    """CLIPTextModel(WithProjection) state dict → ``cond_stage_model.*`` (inverse of convert_ldm_clip_checkpoint or
    convert_open_clip_checkpoint), or under `prefix` (SDXL's ``conditioner.embedders.N.*``). Accepts keys with or
    without ``text_model.`` (transformers ≥ 5.6 dropped it from CLIPTextModel, not from the WithProjection one).

    ``text_projection.weight`` (openclip layout only) is stored transposed as open_clip's ``text_projection``
    ([width, embed_dim]: open_clip computes ``x @ text_projection``); diffusers also reads q/k/v's width from its
    first dimension.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    if layout == "clip":
        return {f"{prefix or CLIP_PREFIX}text_model.{k}": v for k, v in sd.items()}
    if layout != "openclip":
        raise UserError(f"text encoder layout '{layout}': expected clip or openclip")
    import torch

    prefix = prefix or OPENCLIP_PREFIX
    top = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        if key in top:
            out[prefix + top[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)) and m[2] in _OPENCLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = tensor
        else:
            raise _unsupported("text encoder", key)
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"cannot export text encoder: {name} lacks one of q/k/v")
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # open_clip's order
    return out


def has_two_text_encoders(pipe) -> bool:
    """SDXL: a second text encoder (read by attribute, so a bare namespace of components works too)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_to_ldm(pipe, text_encoder_layout: str = "auto") -> dict[str, Any]:
    """All of a StableDiffusion(XL)Pipeline's weights (UNet, VAE, text encoder(s)) in the original single-file
    layout. SDXL's layout is fixed (CLIP-L in transformers' naming, bigG in open_clip's): see `xl_layout`."""
    out = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if has_two_text_encoders(pipe):
        xl_layout(text_encoder_layout)
        out.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), "clip", XL_CLIP_PREFIX))
        out.update(text_encoder_to_ldm(pipe.text_encoder_2.state_dict(), "openclip", XL_OPENCLIP_PREFIX))
        return out
    layout = resolve_text_encoder_layout(pipe.text_encoder.config.hidden_size, text_encoder_layout)
    out.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), layout))
    return out


def xl_layout(text_encoder_layout: str) -> str:
    """SDXL's text-encoder layout, which is not a choice: 'auto' (or 'sdxl') is the only accepted value; clip or
    openclip is refused, since a CLIP-L under open_clip names, or bigG under OpenAI's, is a file no SDXL reader
    loads."""
    if text_encoder_layout not in ("auto", XL_LAYOUT):
        raise UserError(f"--text-encoder-layout {text_encoder_layout} is for SD 1.x/2.x: an SDXL file's text "
                        "encoders have fixed layouts (CLIP-L as clip, OpenCLIP bigG as openclip); leave it at auto")
    return XL_LAYOUT


def check_round_trip(ldm: Mapping[str, Any], pipe, compare_values: bool = True) -> None:
    """Run diffusers' own single-file converters on `ldm` and require every parameter of `pipe`'s UNet, VAE and
    text encoder(s) back under its own name, same shape (and, with `compare_values`, same bits, in `ldm`'s dtype).

    Raises UserError naming the first mismatch: it means diffusers' loader could not read this architecture back.
    """
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = dict(ldm)
    parts = {
        "UNet": (pipe.unet.state_dict(), sfu.convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config)),
        "VAE": (pipe.vae.state_dict(), sfu.convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config)),
    }
    parts.update(_text_encoders_back(checkpoint, pipe, sfu))
    for part, (expected, back) in parts.items():
        _compare_part(part, expected, back, compare_values)


def _text_encoders_back(checkpoint: dict[str, Any], pipe, sfu) -> dict[str, tuple[dict, dict]]:
    """{part: (the model's state dict, what diffusers' converter makes of `checkpoint`)}, both without the
    ``text_model.`` that transformers' CLIPTextModel may or may not have.

    For SDXL these are the converters ``create_diffusers_clip_model_from_ldm`` picks for real SDXL files. It picks
    by width, so ``from_single_file`` reads a file back only when bigG is wider than CLIP-L (as in every real SDXL
    and in tiny_sdxl).
    """
    strip = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items()}  # noqa: E731
    te = pipe.text_encoder
    if has_two_text_encoders(pipe):
        te2 = pipe.text_encoder_2
        return {
            "text encoder": (strip(te.state_dict()), strip(sfu.convert_ldm_clip_checkpoint(checkpoint))),
            "text encoder 2": (strip(te2.state_dict()), strip(
                sfu.convert_open_clip_checkpoint(te2, checkpoint, prefix=XL_OPENCLIP_PREFIX))),
        }
    if sfu.is_open_clip_model(checkpoint):
        back = sfu.convert_open_clip_checkpoint(te, checkpoint, prefix=OPENCLIP_PREFIX)
    else:
        back = sfu.convert_ldm_clip_checkpoint(checkpoint)
    return {"text encoder": (strip(te.state_dict()), strip(back))}


def _compare_part(part: str, expected: Mapping[str, Any], back: Mapping[str, Any], compare_values: bool) -> None:
    missing = sorted(set(expected) - set(back))
    extra = sorted(set(back) - set(expected))
    if missing or extra:
        what = f"'{missing[0]}' would not be loaded" if missing else f"'{extra[0]}' would be unexpected"
        raise UserError(f"diffusers' single-file loader cannot read this {part} back: {what} "
                        f"({len(missing)} missing, {len(extra)} unexpected)")
    for k, want in expected.items():
        got = back[k]
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(f"diffusers' single-file loader would read {part} '{k}' as shape "
                            f"{tuple(got.shape)}, not {tuple(want.shape)}")
        if compare_values and not _same_bits(got, want.to(got.dtype)):
            raise UserError(f"{part} '{k}' does not survive the round trip through diffusers' loader")


def _same_bits(a, b) -> bool:
    import torch

    if a.dtype.is_floating_point:  # compare bits: NaN == NaN, -0.0 != 0.0
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


@dataclasses.dataclass
class ExportResult:
    """What `export_single_file` wrote."""

    path: Path
    num_tensors: int
    num_bytes: int
    dtype: str
    text_encoder_layout: str  # clip or openclip (SD 1.x/2.x), or sdxl (CLIP-L as clip + bigG as openclip)


def export_single_file(
    model: str,
    output: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    ema: bool = False,
    allow_pickle: bool = False,
    text_encoder_layout: str = "auto",
) -> ExportResult:
    """Write `model` (anything `models.load_pipeline` accepts, SD 1.x/2.x or SDXL) as one ``.safetensors`` file in
    the original key layout. `text_encoder_layout` picks SD 1.x/2.x's (auto, clip, openclip); SDXL's is fixed, and
    anything but auto is refused for it.

    `dtype` is fp32 (lossless for fp32 models), fp16 or bf16 (half the size). `ema` exports an ``ldm train``
    checkpoint's EMA weights (its ``pipeline_ema/``). The file is written beside `output` under a temporary name
    and renamed into place, so a reader never sees half a file; an existing `output` needs `overwrite`.
    """
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise UserError(f"output {output} must end in .safetensors (pickle checkpoints are never written)")
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    resolve_text_encoder_layout(0, text_encoder_layout)  # a bad name fails before the model loads
    if output.is_dir():
        raise UserError(f"output {output} is a folder: name a .safetensors file")
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists: choose another name or pass --overwrite")
    if ema:
        model = str(_ema_folder(model))
    import torch  # after the checks above, so a refusal is instant
    from safetensors.torch import save_file

    from ldm_pipeline.models import load_pipeline

    pipe, info = load_pipeline(model, allow_pickle=allow_pickle)
    if has_two_text_encoders(pipe):
        layout = xl_layout(text_encoder_layout)
    else:
        layout = resolve_text_encoder_layout(pipe.text_encoder.config.hidden_size, text_encoder_layout)
    target = getattr(torch, DTYPES[dtype])
    with torch.no_grad():
        ldm = {k: (v.to(target) if v.dtype.is_floating_point else v).contiguous()
               for k, v in pipeline_to_ldm(pipe, layout).items()}
        check_round_trip(ldm, pipe)
    metadata = {
        "format": "pt",
        "ldm_pipeline.format": FORMAT,
        "ldm_pipeline.text_encoder_layout": layout,
        "ldm_pipeline.source": str(info.path or info.name),
        "ldm_pipeline.source_hash": info.hash,
        "ldm_pipeline.dtype": dtype,
        "ldm_pipeline.ema": "true" if ema else "false",
        "ldm_pipeline.config": json.dumps(_configs(pipe), sort_keys=True, default=str),
        "ldm_pipeline.defaults": json.dumps(dataclasses.asdict(info.defaults), sort_keys=True),
        "ldm_pipeline.versions": json.dumps(_versions(), sort_keys=True),
    }
    _write_atomically(ldm, metadata, output, overwrite, save_file)
    nbytes = sum(t.numel() * t.element_size() for t in ldm.values())
    return ExportResult(output, len(ldm), nbytes, dtype, layout)


def _ema_folder(model: str) -> Path:
    path = Path(model).expanduser()
    ema = path / "pipeline_ema"
    if not (ema / "model_index.json").is_file():
        raise UserError(f"--ema: {model} has no EMA weights (no pipeline_ema/ folder): pass an `ldm train` "
                        "checkpoint-STEP folder of a run with EMA (a run's final/ folder already holds the EMA model)")
    return ema


def _configs(pipe) -> dict[str, Any]:
    """The components' own configs, so the file describes its architecture (a loader can rebuild the folder:
    `single_file.config_folder_from_metadata`)."""
    configs = {
        "unet": dict(pipe.unet.config),
        "vae": dict(pipe.vae.config),
        "text_encoder": pipe.text_encoder.config.to_dict(),
        "scheduler": dict(pipe.scheduler.config),
    }
    if has_two_text_encoders(pipe):
        configs["text_encoder_2"] = pipe.text_encoder_2.config.to_dict()
    return configs


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from ldm_pipeline import __version__

    return {"ldm_pipeline": __version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def _write_atomically(tensors: dict[str, Any], metadata: dict[str, str], output: Path, overwrite: bool, save) -> None:
    try:
        with atomic_file(output, overwrite=overwrite) as tmp:
            save(tensors, str(tmp), metadata=metadata)
    except FileExistsError:  # appeared while we were converting
        raise UserError(f"output {output} already exists: choose another name or pass --overwrite") from None
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror or e}") from None
