"""Shipped configs load; precedence defaults < YAML < flags < key=value; unknown keys are errors."""

from __future__ import annotations

import pytest
import yaml

from ldm_pipeline.config import config_dir
from ldm_pipeline.errors import UserError
from ldm_pipeline.training.config import load_train_config, resolve

# configs/train also holds other commands' recipes (e.g. `ldm train-vae`'s shapes_vae): a file is ours when its
# header launches `ldm train ` (with the space)
TRAIN_CONFIGS = sorted(p for p in (config_dir() / "train").glob("*.yaml")
                       if "ldm train " in p.read_text().split("\n\n")[0])
ACCELERATE_CONFIGS = sorted((config_dir() / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_train_configs_load(path, tmp_path):
    cfg = resolve(load_train_config(path, {"model": "tiny", "data": {"source": "x"}, "output_dir": str(tmp_path)}))
    assert cfg.learning_rate > 0 and cfg.max_steps > 0


def test_our_configs_are_all_found():
    assert {p.stem for p in TRAIN_CONFIGS} >= {"sd15_finetune", "sd15_lora", "tiny_test"}


def test_shipped_accelerate_configs():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"} <= names
    for p in ACCELERATE_CONFIGS:
        assert "distributed_type" in yaml.safe_load(p.read_text())


def test_defaults_depend_on_lora(tmp_path):
    base = {"model": "m", "data": {"source": "d"}, "output_dir": str(tmp_path)}
    full = resolve(load_train_config(None, base))
    lora = resolve(load_train_config(None, base, {"lora": {"rank": 4}}))
    assert (full.learning_rate, full.ema.enabled) == (1e-5, True)
    assert (lora.learning_rate, lora.ema.enabled) == (1e-4, False)
    assert full.batch_size == 1 and full.gradient_accumulation_steps == 4 and full.data.resolution == 512


def test_cli_precedence(tmp_path):
    from ldm_pipeline.cli.train import build_parser, config_from_args

    args = build_parser().parse_args(["--config", "tiny_test", "--data", "d", "--output-dir", str(tmp_path),
                                      "--max-steps", "7", "--resolution", "64", "--lora-rank", "4",
                                      "data.random_flip=true", "max_steps=9", "validation.prompts=a,b"])
    cfg = config_from_args(args)
    assert cfg.max_steps == 9  # key=value beats the flag
    assert cfg.data.resolution == 64 and cfg.data.random_flip and cfg.lora.rank == 4
    assert cfg.batch_size == 2  # from the YAML
    assert cfg.validation.prompts == ["a", "b"]


def test_unknown_key_is_an_error():
    with pytest.raises(UserError, match="unknown config key 'data.nope'"):
        load_train_config("tiny_test", {"data": {"nope": 1}})
    with pytest.raises(UserError, match="max_steps"):
        load_train_config("tiny_test", {"max_steps": "many"})


def test_cache_latents_refuses_random_crop(tmp_path):
    cfg = load_train_config("tiny_test", {"data": {"source": "d", "center_crop": False}, "output_dir": str(tmp_path),
                                          "cache_latents": True})
    with pytest.raises(UserError, match="center_crop"):
        resolve(cfg)


@pytest.mark.parametrize("layer, key", [
    ({"data": {"num_workers": -1}}, "data.num_workers"),
    ({"data": {"caption_dropout": 1.5}}, "data.caption_dropout"),
    ({"data": {"resolution": 30}}, "data.resolution"),
    ({"lora": {"text_encoder": True}}, "lora.text_encoder"),
    ({"lora": {"rank": 4, "alpha": 0}}, "lora.alpha"),
    ({"ema": {"enabled": True, "decay": 1.5}}, "ema.decay"),
    ({"adam_beta2": 1.0}, "adam_beta2"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"text_encoder_learning_rate": 0}, "text_encoder_learning_rate"),
    ({"timestep_sampling": "logit_normal", "timestep_logit_std": 0}, "timestep_logit_std"),
    ({"validate_every": 5, "validation": {"num_inference_steps": 0}}, "validation.num_inference_steps"),
    ({"lr_scheduler": "warmup_stable_decay"}, "lr_decay_steps"),  # 0 decay steps
    ({"lr_scheduler": "warmup_stable_decay", "max_steps": 100, "lr_warmup_steps": 10, "lr_decay_steps": 91},
     "lr_decay_steps"),
])
def test_impossible_values_name_their_key(tmp_path, layer, key):
    base = {"model": "m", "data": {"source": "d"}, "output_dir": str(tmp_path)}
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        resolve(load_train_config("tiny_test", base, layer))


def test_prediction_type_sample_is_refused():
    with pytest.raises(UserError, match="prediction_type"):
        load_train_config("tiny_test", {"prediction_type": "sample"})


def test_unknown_timestep_sampling_is_refused():
    with pytest.raises(UserError, match="timestep_sampling"):
        load_train_config("tiny_test", {"timestep_sampling": "cosmap"})
