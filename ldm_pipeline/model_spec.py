"""What a model is before it is loaded: an architecture (``configs/models/*.yaml``, one constructor-argument dict per
diffusers/transformers part) and the generation defaults a model folder carries beside its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.config import from_dict, load_yaml, resolve_config_path
from ldm_pipeline.files import atomic_write_text

DEFAULTS_FILE = "ldm_defaults.json"  # our generation defaults, stored beside model_index.json


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
    # SDXL: the second text encoder (CLIPTextModelWithProjection: hidden states and the pooled embedding)
    text_encoder_2: dict[str, Any] | None = None
    tokenizer_2: str | None = None
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)


def load_model_spec(spec: str | Path) -> ModelSpec:
    """Read an architecture YAML (a path or a name under configs/models/)."""
    return from_dict(ModelSpec, load_yaml(resolve_config_path(spec, "models")))



def write_defaults(folder: Path, defaults: GenerationDefaults) -> bool:
    """Store a model folder's sampling defaults (atomically); False if unchanged."""
    path = Path(folder) / DEFAULTS_FILE
    text = json.dumps(dataclasses.asdict(defaults), indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True
