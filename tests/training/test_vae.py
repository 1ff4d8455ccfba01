"""Stage 1 (`ldm train-vae`): a tiny AutoencoderKL trained a few steps on fixture shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ldm_pipeline.errors import UserError
from ldm_pipeline.training.vae import VAETrainConfig, build_vae, load_vae_train_config, moments_conv, train_vae

TINY_VAE = {
    "sample_size": 32,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "mid_block_add_attention": False,
}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arch") / "tiny_vae.yaml"
    path.write_text(yaml.safe_dump({"vae": TINY_VAE}))
    return path


def make_config(arch, data, out, **overrides) -> VAETrainConfig:
    layer = {
        "model": str(arch), "output_dir": str(out), "max_steps": 12, "batch_size": 4, "learning_rate": 5e-3,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "eval_every": 6, "num_eval_images": 6,
        "eval_batch_size": 4, "num_grid_images": 4, "progress_bar": False, "num_threads": 1,
        "data": {"source": str(data), "resolution": 32, "num_workers": 0, "shuffle_buffer": 0},
    }
    return load_vae_train_config(None, layer, overrides)


@pytest.fixture(scope="module")
def trained(tiny_arch, tmp_path_factory):
    from tests.fixtures import write_laion_fixture

    data = tmp_path_factory.mktemp("vae_data")
    write_laion_fixture(data, n=16, shards=2)
    out = tmp_path_factory.mktemp("vae_run") / "run"
    return train_vae(make_config(tiny_arch, data, out)), out, data


def test_training_reduces_the_loss(trained):
    result, _, _ = trained
    losses = [v for _, v in result.losses]
    assert result.steps == len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_psnr_and_scaling_factor_are_saved(trained):
    import math

    from diffusers import AutoencoderKL
    from PIL import Image

    result, out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["psnr"]) and metrics["psnr"] == pytest.approx(result.psnr)
    assert metrics["scaling_factor"] > 0 and metrics["scaling_factor"] == pytest.approx(result.scaling_factor)
    assert metrics["steps"] == 12 and metrics["seconds"] > 0 and metrics["num_eval_images"] == 6
    assert [s for s, _ in result.psnr_history] == [6, 12]
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(result.scaling_factor)
    assert list(vae.config.block_out_channels) == TINY_VAE["block_out_channels"]
    assert Image.open(out / "reconstructions.png").size == (4 * 64, 2 * 64)  # 4 pairs, upscaled 2x
    assert (out / "loss_curve.png").is_file()
    saved = yaml.safe_load((out / "train_vae_config.yaml").read_text())
    assert saved["max_steps"] == 12 and saved["data"]["resolution"] == 32


def test_logvar_bias_init_is_applied(tiny_arch, tmp_path):
    import torch

    cfg = make_config(tiny_arch, tmp_path, tmp_path / "o", logvar_bias_init=-7.0)
    vae, source = build_vae(cfg)
    bias = moments_conv(vae).bias
    assert source == "config"
    assert torch.all(bias[4:] == -7.0) and not torch.all(bias[:4] == -7.0)
    plain, _ = build_vae(make_config(tiny_arch, tmp_path, tmp_path / "o", logvar_bias_init=None))
    assert not torch.all(moments_conv(plain).bias[4:] == -7.0)


def test_a_saved_vae_is_loaded_as_it_is(trained, tmp_path):
    import torch

    _, out, data = trained
    vae, source = build_vae(make_config(out / "vae", data, tmp_path / "o"))
    assert source == "folder" and vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not default
    assert not torch.all(moments_conv(vae).bias[4:] == -8.0)  # the init is for fresh models only


def test_resume_continues_exactly(tiny_arch, trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    _, _, data = trained
    full = tmp_path / "full"
    train_vae(make_config(tiny_arch, data, full, max_steps=4, checkpoint_every=2, checkpoints_total_limit=2,
                          eval_every=0))
    assert (full / "checkpoint-2" / "training_state.json").is_file()
    resumed = tmp_path / "resumed"
    result = train_vae(make_config(tiny_arch, data, resumed, max_steps=4, eval_every=0,
                                   resume=str(full / "checkpoint-2")))
    assert result.steps == 4 and len(result.losses) == 4
    a, b = load_file(full / "vae" / "diffusion_pytorch_model.safetensors"), load_file(
        resumed / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors(tiny_arch, trained, tmp_path):
    _, _, data = trained
    with pytest.raises(UserError, match="single shard"):
        train_vae(make_config(tiny_arch, data / "00000.tar", tmp_path / "o"))
    with pytest.raises(UserError, match="no `vae:`"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("unet: {}\n")
        train_vae(make_config(bad, data, tmp_path / "o2"))
    with pytest.raises(UserError, match="not empty"):
        (tmp_path / "o3").mkdir()
        (tmp_path / "o3" / "x").write_text("x")
        train_vae(make_config(tiny_arch, data, tmp_path / "o3"))
    # resume=latest before any checkpoint exists is a fresh start in the same directory
    assert train_vae(make_config(tiny_arch, data, tmp_path / "o3", max_steps=1, resume="latest")).steps == 1


def test_shipped_config_loads():
    from ldm_pipeline.training.vae import check_config

    cfg = load_vae_train_config("shapes_vae", {"data": {"source": "x"}, "output_dir": "o"})
    check_config(cfg)
    assert cfg.data.resolution == 64 and cfg.logvar_bias_init is not None


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_trains(tiny_arch, trained, tmp_path, capsys):
    from ldm_pipeline.cli.train_vae import main

    _, _, data = trained
    # a single training shard is fine when the held-out images come from elsewhere
    code = main(["--data", str(data / "00000.tar"), "--eval-data", str(data / "00001.tar"),
                 "--output-dir", str(tmp_path / "cli"), "--model", str(tiny_arch),
                 "--max-steps", "2", "--batch-size", "4", "--no-progress", "data.resolution=32", "num_eval_images=4",
                 "eval_every=0", "checkpoint_every=0", "num_threads=1"])
    assert code == 0
    assert "PSNR" in capsys.readouterr().out
    assert (tmp_path / "cli" / "vae" / "config.json").is_file()
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["num_eval_images"] == 4


@pytest.mark.parametrize("argv, message", [
    ([], "no training data"),
    (["--data", "d", "--output-dir", "o", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--data", "d", "--output-dir", "o", "max_steps=many"], "max_steps: expected an integer"),
    (["--data", "{data}", "--output-dir", "{out}", "--model", "no_such_model"], "config 'no_such_model' not found"),
    (["--data", "{data}", "--output-dir", "{out}", "--max-steps", "0"], "max_steps must be at least 1"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, trained, tmp_path, capsys):
    from ldm_pipeline.cli.train_vae import main

    _, _, data = trained
    argv = [a.format(data=data, out=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("ldm train-vae: error:")


def test_warmup_defaults_to_a_share_of_the_run_and_a_long_one_is_reported(tiny_arch, trained, tmp_path, capsys):
    import dataclasses

    from ldm_pipeline.training.vae import effective_config

    _, _, data = trained
    unset = dataclasses.replace(make_config(tiny_arch, data, tmp_path / "a", max_steps=40), lr_warmup_steps=None)
    assert effective_config(unset).lr_warmup_steps == 4  # was a fixed 50: all of the run
    train_vae(make_config(tiny_arch, data, tmp_path / "b", max_steps=2, lr_warmup_steps=5, lr_scheduler="cosine",
                          eval_every=0))
    assert ("lr_warmup_steps 5 is not shorter than the run (max_steps 2): the learning rate only reaches 0.0017 "
            "instead of 0.005") in capsys.readouterr().err


def test_last_step_is_checkpointed_and_resume_latest_does_no_step(tiny_arch, trained, tmp_path):
    """checkpoint_every 0 still checkpoints the last step: resume=latest with the same max_steps trains nothing
    more (it used to start again from scratch) and gives back the same weights."""
    import torch
    from safetensors.torch import load_file

    _, _, data = trained
    out = tmp_path / "run"
    first = train_vae(make_config(tiny_arch, data, out, max_steps=3, checkpoint_every=0, eval_every=0))
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-3"]
    weights = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    again = train_vae(make_config(tiny_arch, data, out, max_steps=3, checkpoint_every=0, eval_every=0,
                                  resume="latest"))
    assert again.steps == 3 and again.losses == first.losses and again.psnr == pytest.approx(first.psnr)
    same = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], same[k]) for k in weights)
