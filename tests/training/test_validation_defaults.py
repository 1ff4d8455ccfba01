"""Validation grids follow the model: prompts from the config win, else the model's example prompts, else generic
ones; size, steps, guidance and sampler are the model's defaults unless the config sets them."""

from __future__ import annotations

import json
import shutil

import yaml

from ldm_pipeline.models import GenerationDefaults
from ldm_pipeline.training.config import GENERIC_VALIDATION_PROMPTS, ValidationSettings
from ldm_pipeline.training.validation import resolve_settings

SHAPES = GenerationDefaults(height=64, width=64, num_inference_steps=20, guidance_scale=4.0, scheduler="dpm++2m",
                            example_prompts=["a red circle on a blue background", "a purple square"])


def test_prompts_config_then_model_then_generic():
    assert resolve_settings(ValidationSettings(), SHAPES).prompts == SHAPES.example_prompts
    assert resolve_settings(ValidationSettings(), GenerationDefaults()).prompts == GENERIC_VALIDATION_PROMPTS
    assert resolve_settings(ValidationSettings(prompts=["mine"]), SHAPES).prompts == ["mine"]
    assert resolve_settings(ValidationSettings(prompts=[]), SHAPES).prompts == []  # explicitly none: no grids


def test_sampling_settings_follow_the_model_unless_set():
    got = resolve_settings(ValidationSettings(), SHAPES)
    assert (got.height, got.width, got.num_inference_steps, got.guidance_scale, got.scheduler) == (
        64, 64, 20, 4.0, "dpm++2m")
    mine = ValidationSettings(height=32, width=48, num_inference_steps=3, guidance_scale=1.0, scheduler="euler")
    got = resolve_settings(mine, SHAPES)
    assert (got.height, got.width, got.num_inference_steps, got.guidance_scale, got.scheduler) == (
        32, 48, 3, 1.0, "euler")


def test_the_shipped_model_validates_with_its_own_prompts():
    from ldm_pipeline.config import from_dict
    from ldm_pipeline.models import DEFAULTS_FILE, SHIPPED_MODEL

    defaults = from_dict(GenerationDefaults, json.loads((SHIPPED_MODEL / DEFAULTS_FILE).read_text()))
    assert defaults.example_prompts  # the shipped model names its own
    got = resolve_settings(ValidationSettings(), defaults)
    assert got.prompts == defaults.example_prompts and not set(got.prompts) & set(GENERIC_VALIDATION_PROMPTS)
    assert (got.height, got.num_inference_steps, got.scheduler) == (defaults.height, defaults.num_inference_steps,
                                                                    defaults.scheduler)


def test_a_run_samples_with_the_models_prompts_and_defaults(tiny_model, laion_data, tmp_path, monkeypatch):
    from ldm_pipeline.training import train, validation
    from tests.training.conftest import make_config

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    prompts = ["sample 1, tag1", "sample 2, tag2, color2"]
    (model / "ldm_defaults.json").write_text(json.dumps({"height": 40, "width": 48, "num_inference_steps": 2,
                                                         "guidance_scale": 2.0, "scheduler": "euler",
                                                         "example_prompts": prompts}))
    seen = []
    real = validation.sample_images

    def spy(pipe, info, settings, height, width, device):
        seen.append((settings, height, width))
        return real(pipe, info, settings, height, width, device)

    monkeypatch.setattr(validation, "sample_images", spy)
    out = tmp_path / "run"
    # tiny_test's own validation settings cleared: what a config that sets none gets
    train(make_config(model, laion_data, out, max_steps=1, validate_every=1, checkpoint_every=0,
                      validation={"prompts": None, "num_inference_steps": None, "guidance_scale": None}))
    [(settings, height, width)] = seen
    assert settings.prompts == prompts and (height, width) == (40, 48)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.scheduler) == (2, 2.0, "euler")
    assert (out / "samples" / "step-0000001.png").is_file()
    # the saved config keeps "the model's default" (None): rerun with the same config, it compares equal (ldm recipe
    # reuses a stage only then), and the saved model carries the defaults themselves
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())["validation"]
    assert recorded["prompts"] is None and recorded["height"] is None
