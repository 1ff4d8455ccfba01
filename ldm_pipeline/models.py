"""Load a model from whatever the user has: a diffusers folder, a single-file checkpoint, a hub id, or a YAML
architecture (``configs/models/*.yaml``, random weights); and write new random-initialised model folders.

Everything comes back as a diffusers ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) plus a
`ModelInfo` (name, content hash, the model's own generation defaults) so generation, training and export share one
loader. What a single file's architecture is comes from `ldm_pipeline.single_file`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_pipeline.config import from_dict
from ldm_pipeline.errors import UserError
from ldm_pipeline.files import atomic_dir
from ldm_pipeline.hashes import folder_hash, hub_snapshot_hash
from ldm_pipeline.model_spec import DEFAULTS_FILE, GenerationDefaults, ModelSpec, load_model_spec, write_defaults
from ldm_pipeline.tokenizer import load_tokenizer

# re-exported: what a model is (model_spec) and how it loads (here) are imported together by callers
__all__ = ["DEFAULTS_FILE", "GenerationDefaults", "ModelSpec", "load_model_spec", "write_defaults"]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class ModelInfo:
    """Where a loaded model came from, for metadata and replay."""

    name: str  # what the user passed (path or hub id), or the config name
    source: str  # "folder" | "single_file" | "hub" | "config"
    hash: str | None  # A1111-style short content hash (sha256 of the weights, first 10 hex digits); None: unknown
    defaults: GenerationDefaults
    path: str | None = None


# --- building from an architecture --------------------------------------------------------------------------


def build_components(spec: ModelSpec, seed: int = 0) -> dict[str, Any]:
    """Random-initialised components for `spec`, seeded per component like diffusers' tests."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_pipeline.schedulers import scheduler_from_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    tokenizer = load_tokenizer(spec.tokenizer)
    scheduler = scheduler_from_config(spec.scheduler)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if spec.text_encoder_2 is not None:
        torch.manual_seed(seed + 3)
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
        parts["tokenizer_2"] = load_tokenizer(spec.tokenizer_2 or "clip-vit-large-patch14-pad0")
    return parts


XL_PARTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL pipeline has beyond SD's parts


def is_xl(pipe_or_components) -> bool:
    """Whether a pipeline (or its components) is SDXL-architecture: two text encoders, pooled and size conditioning."""
    parts = pipe_or_components if isinstance(pipe_or_components, dict) else pipe_or_components.components
    return parts.get("text_encoder_2") is not None


def pipeline_from_components(components: dict[str, Any]):
    """A StableDiffusionPipeline without the safety checker (we ship none, and it needs hub weights), or a
    StableDiffusionXLPipeline (without the invisible watermark, which changes pixels) when there are two text
    encoders."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    if is_xl(components):
        parts = {k: components[k] for k in names + XL_PARTS}
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    parts = {k: components[k] for k in names}
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pipeline_class(folder: Path):
    """StableDiffusionXLPipeline for a folder whose model_index.json names it (or a second text encoder), else
    StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return StableDiffusionPipeline
    return StableDiffusionXLPipeline if "XL" in str(index.get("_class_name")) or "text_encoder_2" in index \
        else StableDiffusionPipeline


def load_kwargs(cls, kwargs: dict) -> dict:
    """`from_pretrained` keyword arguments for pipeline class `cls`: SD's safety-checker switches, or SDXL's."""
    if cls.__name__.startswith("StableDiffusionXL"):
        return {**{k: v for k, v in kwargs.items() if "safety_checker" not in k}, "add_watermarker": False}
    return kwargs


def init_model(spec: ModelSpec | str | Path, output: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-initialised diffusers model folder for `spec` (atomically; refuses to overwrite)."""
    if not isinstance(spec, ModelSpec):
        spec = load_model_spec(spec)
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists: choose another --output or pass --overwrite")
    pipe = pipeline_from_components(build_components(spec, seed))
    save_pipeline(pipe, output, defaults=spec.defaults, overwrite=overwrite)
    return output


def save_pipeline(pipe, output: str | Path, defaults: GenerationDefaults | None = None, overwrite: bool = False) -> Path:
    """Save a pipeline as a diffusers folder in safetensors, built under a temporary name and renamed into place."""
    output = Path(output)
    try:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            if defaults is not None:
                write_defaults(tmp, defaults)
    except FileExistsError:
        raise UserError(f"{output} already exists: pass --overwrite to replace it") from None
    return output


# --- loading -----------------------------------------------------------------------------------------------


def read_defaults(folder: Path, pipe) -> GenerationDefaults:
    f = folder / DEFAULTS_FILE
    if f.is_file():
        try:
            return from_dict(GenerationDefaults, json.loads(f.read_text()))
        except (ValueError, UserError):
            pass
    return _infer_defaults(pipe)


def _infer_defaults(pipe) -> GenerationDefaults:
    """SD-like defaults sized to the model's native resolution (SDXL: the Euler sampler and CFG 5 it ships with)."""
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    if is_xl(pipe):
        return GenerationDefaults(height=size, width=size, num_inference_steps=30, guidance_scale=5.0, scheduler="euler")
    return GenerationDefaults(height=size, width=size)


SHIPPED_MODELS: dict[str, Path] = {"shapes": ASSETS / "models" / "shapes"}  # trained by `ldm recipe shapes --package`
SHIPPED_MODEL = SHIPPED_MODELS["shapes"]  # the default --model
CONFIG_PREFIX = "config:"  # `--model config:NAME`: random weights from configs/models/NAME.yaml, said explicitly


def default_model() -> str | None:
    """The model used when --model is not given: $LDM_MODEL, else the model shipped in the package, if any."""
    env = os.environ.get("LDM_MODEL")
    if env:
        return env
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "model_index.json").is_file() else None


def resolve_model(model: str | None) -> str:
    """The model to load: the given one, or the default; a one-line error if there is neither. A shipped model's
    name (``shapes``) means its folder, unless a file or folder of that name exists here (a path always wins)."""
    model = model or default_model()
    if not model:
        raise UserError("no model given: pass --model (a diffusers folder, a .safetensors file or a hub id)")
    if model in SHIPPED_MODELS and not Path(model).expanduser().exists():
        folder = SHIPPED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise UserError(f"the shipped model '{model}' is missing from this installation ({folder}): reinstall "
                            "ldm_pipeline")
        return str(folder)
    return model


def shipped_name(path: Path) -> str | None:
    """The name of a shipped model whose folder `path` is, else None."""
    path = path.resolve()
    return next((name for name, folder in SHIPPED_MODELS.items() if folder.resolve() == path), None)


# folder names ldm train / ldm recipe give every run: on their own they say nothing about which model it is
_RUN_FOLDER_NAMES = ("final", "final_raw", "final_ema", "pipeline", "pipeline_ema")


def display_name(path: Path) -> str:
    """A model folder's name for people (A1111's ``Model:``): a shipped model's name, or the folder name, prefixed
    with the run's folder for what ``ldm train`` writes (``runs/cats/final`` → ``cats-final``,
    ``runs/cats/checkpoint-300/pipeline`` → ``cats-checkpoint-300``)."""
    path = path.resolve()
    if name := shipped_name(path):
        return name
    if path.name == "pipeline" and path.parent.name.startswith("checkpoint-"):
        path = path.parent
    if path.name in _RUN_FOLDER_NAMES or path.name.startswith("checkpoint-"):
        return f"{path.parent.name}-{path.name}"
    return path.name


def load_pipeline(
    model: str | None = None,
    *,
    torch_dtype=None,
    allow_pickle: bool = False,
    seed: int = 0,
    model_config: str | None = None,
):
    """Load `model` as a StableDiffusionPipeline or StableDiffusionXLPipeline; returns (pipeline, ModelInfo).

    `model` may be a diffusers folder, a training checkpoint folder (its ``pipeline/`` subfolder), a single-file
    SD 1.x/2.x/XL checkpoint, an architecture (``config:NAME`` or a YAML: random weights from `seed`), a shipped
    model's name, or a hub id. A single file's architecture comes from `model_config` (a diffusers folder or a
    configs/models name) if given, else from the metadata ``ldm export`` writes, else from its keys
    (`ldm_pipeline.single_file`). SDXL-architecture models come back as a StableDiffusionXLPipeline (`is_xl`).
    """
    model = resolve_model(model)
    import diffusers
    import transformers

    # "Loading pipeline components" / "Loading weights" bars are noise for a CLI user
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = Path(model).expanduser()
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if path.is_dir() and not (path / "model_index.json").is_file() and (path / "pipeline" / "model_index.json").is_file():
        path = path / "pipeline"  # an `ldm train` checkpoint directory
    if path.is_dir():
        return _load_folder(path, allow_pickle, kwargs)
    if model.startswith(CONFIG_PREFIX) or path.suffix in (".yaml", ".yml"):
        return _load_architecture(model, seed, torch_dtype)
    if not path.exists() and _is_config_name(model):
        raise UserError(f"'{model}' is an architecture (configs/models/{model}.yaml) with no trained weights: pass "
                        f"--model {CONFIG_PREFIX}{model} to build it with random weights, or a model folder or file")
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or path.is_file():
        return _load_single_file(path, allow_pickle, model_config, kwargs)
    if _looks_like_hub_id(model):
        return _load_hub(model, allow_pickle, kwargs)
    raise UserError(f"model not found: {model} (expected a diffusers folder, a .safetensors file or a hub id)")


def _load_folder(path: Path, allow_pickle: bool, kwargs: dict):
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers model folder (no model_index.json)")
    if not allow_pickle and (pickled := pickle_only_weights(path)):
        raise UserError(
            f"model folder {path} has pickle weights ({pickled}), which can run arbitrary code when loaded: "
            "convert them to .safetensors, or pass --allow-pickle"
        )
    # safetensors only, unless the user allows pickle: diffusers would otherwise fall back to .bin weights
    use_safetensors = None if allow_pickle else True
    try:
        cls = pipeline_class(path)
        pipe = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=use_safetensors,
                                   **load_kwargs(cls, kwargs))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model folder {path}: {first_line(e)}") from None
    return pipe, ModelInfo(display_name(path), "folder", folder_hash(path)[:10], read_defaults(path, pipe),
                           str(path.resolve()))


def _load_single_file(path: Path, allow_pickle: bool, model_config: str | None, kwargs: dict):
    """A single-file checkpoint as a pipeline (SD or SDXL, by its keys or `model_config`) and its ModelInfo."""
    from ldm_pipeline.hashes import file_sha256
    from ldm_pipeline.single_file import config_folder_for

    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded: convert it to "
            ".safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise UserError(f"unsupported model file {path.name}: expected .safetensors (or .ckpt with --allow-pickle)")
    config = config_folder_for(path, allow_pickle, model_config)
    cls = pipeline_class(config)
    try:  # the file itself was checked above; the config folder has no weights
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, **load_kwargs(cls, kwargs))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {path.name} as an SD checkpoint: {first_line(e)}") from None
    defaults = read_defaults(config, pipe)
    return pipe, ModelInfo(path.name, "single_file", file_sha256(path)[:10], defaults, str(path.resolve()))


def _load_architecture(model: str, seed: int, torch_dtype):
    arch = model.removeprefix(CONFIG_PREFIX)
    if not Path(arch).expanduser().is_file() and not _is_config_name(arch):
        raise UserError(f"no architecture config '{arch}': use a configs/models name "
                        f"({', '.join(config_names())}) or a .yaml path")
    spec = load_model_spec(arch)
    pipe = pipeline_from_components(build_components(spec, seed))
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    where = str(Path(arch).expanduser().resolve()) if Path(arch).expanduser().is_file() else model
    return pipe, ModelInfo(model, "config", f"seed{seed}", spec.defaults, where)


def _load_hub(model: str, allow_pickle: bool, kwargs: dict):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        index = DiffusionPipeline.load_config(model, local_files_only=offline)
        cls = StableDiffusionXLPipeline if "XL" in str(index.get("_class_name")) else StableDiffusionPipeline
        pipe = cls.from_pretrained(model, local_files_only=offline, use_safetensors=None if allow_pickle else True,
                                   **load_kwargs(cls, kwargs))
    except Exception as e:  # hub errors come in many types (network, 404, gated, offline)
        if offline or "offline" in str(e).lower() or "connect" in str(e).lower():
            raise UserError(
                f"model '{model}' is not available locally and the hub cannot be reached (offline): "
                "pass a local folder or .safetensors file"
            ) from None
        if not allow_pickle and "safetensors" in str(e):
            raise UserError(
                f"model '{model}' has no .safetensors weights on the hub, only pickle ones, which can run "
                "arbitrary code when loaded: pass --allow-pickle to load them"
            ) from None
        raise UserError(f"cannot load model '{model}' from the hub: {first_line(e)}") from None
    return pipe, ModelInfo(model, "hub", hub_snapshot_hash(model), _infer_defaults(pipe), None)


def pickle_only_weights(folder: Path) -> str | None:
    """The first component of a diffusers folder whose weights exist only as pickle (.bin/.pt/.ckpt), as a
    relative path; None if every component has safetensors (or no weights)."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        pickled = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            return str(pickled[0].relative_to(folder))
    return None


def _is_config_name(name: str) -> bool:
    return name in config_names()


def config_names() -> list[str]:
    """The architectures under configs/models (``--model config:NAME``)."""
    from ldm_pipeline.config import config_dir

    return sorted(p.stem for p in (config_dir() / "models").glob("*.yaml"))


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~")) and " " not in model


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
