"""Load a model from whatever the user has: a diffusers folder, a single-file checkpoint, a hub id, or a YAML
architecture (``configs/models/*.yaml``, random weights); and write new random-initialised model folders.

Everything comes back as a diffusers ``StableDiffusionPipeline`` plus a `ModelInfo` (name, content hash, the
model's own generation defaults) so generation, training and export share one loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.config import from_dict, load_yaml, resolve_config_path
from ldm_pipeline.errors import UserError
from ldm_pipeline.files import CACHE_DIR, atomic_dir, atomic_write_text, make_temp_dir
from ldm_pipeline.hashes import file_sha256, folder_hash, hub_snapshot_hash
from ldm_pipeline.tokenizer import load_tokenizer

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
DEFAULTS_FILE = "ldm_defaults.json"  # our generation defaults, stored beside model_index.json
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class GenerationDefaults:
    """A model's own sampling defaults: what a bare ``ldm txt2img "..."`` uses."""

    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_cutoff: float = 0.0  # classifier-free guidance only at timesteps >= this fraction of the schedule
    scheduler: str = "ddim"
    # prompts that show what this model can draw: training's validation prompts default to them
    example_prompts: list[str] = field(default_factory=list)


@dataclass
class ModelSpec:
    """An architecture from ``configs/models/*.yaml``: constructor arguments of each diffusers/transformers part."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    tokenizer: str = "clip-vit-large-patch14"
    description: str = ""
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)


@dataclass
class ModelInfo:
    """Where a loaded model came from, for metadata and replay."""

    name: str  # what the user passed (path or hub id), or the config name
    source: str  # "folder" | "single_file" | "hub" | "config"
    hash: str | None  # A1111-style short content hash (sha256 of the weights, first 10 hex digits); None: unknown
    defaults: GenerationDefaults
    path: str | None = None


def load_model_spec(spec: str | Path) -> ModelSpec:
    """Read an architecture YAML (a path or a name under configs/models/)."""
    return from_dict(ModelSpec, load_yaml(resolve_config_path(spec, "models")))


# --- building from an architecture --------------------------------------------------------------------------


def build_components(spec: ModelSpec, seed: int = 0) -> dict[str, Any]:
    """Random-initialised components for `spec`, seeded per component like diffusers' tests."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_pipeline.schedulers import scheduler_from_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    tokenizer = load_tokenizer(spec.tokenizer)
    scheduler = scheduler_from_config(spec.scheduler)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def pipeline_from_components(components: dict[str, Any]):
    """A StableDiffusionPipeline without the safety checker (we ship none, and it needs hub weights)."""
    from diffusers import StableDiffusionPipeline

    parts = {k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


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


def write_defaults(folder: Path, defaults: GenerationDefaults) -> bool:
    """Store a model folder's sampling defaults (atomically); False if unchanged."""
    path = Path(folder) / DEFAULTS_FILE
    text = json.dumps(dataclasses.asdict(defaults), indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


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


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rename_into_place(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():  # another process won the race with identical content
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


# --- loading -----------------------------------------------------------------------------------------------


def _read_defaults(folder: Path, pipe) -> GenerationDefaults:
    f = folder / DEFAULTS_FILE
    if f.is_file():
        try:
            return from_dict(GenerationDefaults, json.loads(f.read_text()))
        except (ValueError, UserError):
            pass
    return _infer_defaults(pipe)


def _infer_defaults(pipe) -> GenerationDefaults:
    """SD-like defaults sized to the model's native resolution."""
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return GenerationDefaults(height=size, width=size)


def detect_single_file_arch(path: Path, allow_pickle: bool) -> str:
    """'sd15' or 'sd21' from the checkpoint's cross-attention width (768: SD 1.x, 1024: SD 2.x)."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if key not in keys:
                    raise UserError(
                        f"{path} is not a Stable Diffusion 1.x/2.x checkpoint in the original (CompVis) key layout"
                    )
                width = f.get_slice(key).get_shape()[1]
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        import torch

        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"cannot read {path} (weights_only=True): {str(e).splitlines()[0][:200]}") from None
        while isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        if key not in sd:
            raise UserError(f"{path} is not a Stable Diffusion 1.x/2.x checkpoint in the original (CompVis) key layout")
        width = sd[key].shape[1]
    return {768: "sd15", 1024: "sd21"}.get(int(width)) or _unknown_width(path, width)


def _unknown_width(path: Path, width: int) -> str:
    raise UserError(f"{path}: cross-attention width {width} is neither SD 1.x (768) nor SD 2.x (1024)")


def offline_config_folder(arch: str) -> Path:
    """A weightless diffusers folder (configs + tokenizer) for `arch`, so single-file loading needs no hub."""
    out = CACHE_DIR / "single_file_configs" / arch
    if (out / "model_index.json").is_file():
        return out
    spec = load_model_spec(arch)
    unet = {"_class_name": "UNet2DConditionModel", **spec.unet}
    vae = {"_class_name": "AutoencoderKL", **spec.vae}
    return _write_config_folder(out, unet, vae, spec.text_encoder, spec.tokenizer, spec.scheduler, spec.defaults)


def _config_folder_from_metadata(path: Path) -> Path | None:
    """For a file written by ``ldm export``: its architecture, from the configs it records in its metadata."""
    from safetensors import safe_open

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
    tokenizer = "clip-vit-large-patch14-pad0" if te.get("pad_token_id") == 0 else "clip-vit-large-patch14"
    defaults = from_dict(GenerationDefaults, json.loads(meta.get("ldm_pipeline.defaults", "{}")))
    return _write_config_folder(out, configs["unet"], configs["vae"], te, tokenizer, configs["scheduler"], defaults)


def _write_config_folder(out: Path, unet: dict, vae: dict, text_encoder: dict, tokenizer: str, scheduler: dict,
                         defaults: GenerationDefaults) -> Path:
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}-")
    for name, cfg in (("unet", unet), ("vae", vae)):
        _ensure(tmp / name)
        (tmp / name / "config.json").write_text(json.dumps(cfg, indent=2))
    _ensure(tmp / "text_encoder")
    te = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text_encoder}
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(te, indent=2))
    load_tokenizer(tokenizer).save_pretrained(tmp / "tokenizer")
    _ensure(tmp / "scheduler")
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    write_defaults(tmp, defaults)
    _rename_into_place(tmp, out)
    return out


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
    """Load `model` as a StableDiffusionPipeline; returns (pipeline, ModelInfo).

    `model` may be a diffusers folder, a training checkpoint folder (its ``pipeline/`` subfolder), a single-file
    SD 1.x/2.x checkpoint, an architecture (``config:NAME`` or a YAML: random weights from `seed`), a shipped
    model's name, or a hub id. A single file's architecture comes from `model_config` (a diffusers folder or a
    configs/models name) if given, else from the metadata ``ldm export`` writes, else from its cross-attention
    width (SD 1.x or 2.x).
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
    from diffusers import StableDiffusionPipeline

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
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=use_safetensors,
                                                       **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model folder {path}: {_first_line(e)}") from None
    return pipe, ModelInfo(display_name(path), "folder", folder_hash(path)[:10], _read_defaults(path, pipe),
                           str(path.resolve()))


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


def _load_single_file(path: Path, allow_pickle: bool, model_config: str | None, kwargs: dict):
    from diffusers import StableDiffusionPipeline

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
    if model_config is not None:  # the user names the architecture
        config = Path(model_config) if Path(model_config).is_dir() else offline_config_folder(model_config)
    elif suffix == ".safetensors" and (config := _config_folder_from_metadata(path)) is not None:
        pass  # written by `ldm export`: it records its own architecture
    else:
        config = offline_config_folder(detect_single_file_arch(path, allow_pickle))
    try:  # the file itself was checked above; the config folder has no weights
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {path.name} as an SD checkpoint: {_first_line(e)}") from None
    defaults = _read_defaults(config, pipe)
    return pipe, ModelInfo(path.name, "single_file", file_sha256(path)[:10], defaults, str(path.resolve()))


def _load_hub(model: str, allow_pickle: bool, kwargs: dict):
    from diffusers import StableDiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=offline,
                                                       use_safetensors=None if allow_pickle else True, **kwargs)
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
        raise UserError(f"cannot load model '{model}' from the hub: {_first_line(e)}") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
