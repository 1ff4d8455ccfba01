"""In-process `train(config)` on the tiny model: learning, outputs, NaN handling, LoRA, latent caching."""

from __future__ import annotations

import json

import pytest

from ldm_pipeline.training import train
from ldm_pipeline.training.loop import TrainingDiverged
from ldm_pipeline.training.step import TrainHooks
from tests.training.conftest import make_config
from tests.training.hooks import nan_loss


def test_overfit_outputs_and_checkpoints(tiny_model, laion_data, tmp_path):
    out = tmp_path / "run"
    res = train(make_config(tiny_model, laion_data, out, max_steps=30, checkpoint_every=10, validate_every=15))
    losses = [v for _, v in res.losses]
    assert res.global_step == 30 and res.samples_seen == 30 * 4 and res.bad_steps == 0
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses  # it learns
    # checkpoints: total limit 2, atomic (no .tmp left), each with config, state and a loadable pipeline
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-20", "checkpoint-30"]
    assert not [n for n in names if n.endswith(".tmp")]
    ck = out / "checkpoint-20"
    for f in ("train_config.yaml", "training_state.json", "model.safetensors", "optimizer.bin",
              "random_states_0.pkl", "rank_states/rank0.json", "pipeline/model_index.json",
              "pipeline_ema/model_index.json"):
        assert (ck / f).exists(), f
    from ldm_pipeline.models import load_pipeline

    pipe, _ = load_pipeline(str(ck))  # `ldm txt2img --model OUTPUT_DIR/checkpoint-STEP`
    assert pipe.unet is not None
    # final model, card, curve, samples, tensorboard
    card = (out / "final" / "README.md").read_text()
    assert "base_model:" in card and "samples seen" in card and str(laion_data) in card
    assert "full fine-tune of the UNet and text encoder" in card and "EMA weights" in card
    assert (out / "final" / "model_index.json").is_file() and (out / "final_raw" / "model_index.json").is_file()
    assert (out / "loss_curve.png").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000015.png", "step-0000030.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 30 and metrics["data"]["used"] > 0


def test_nan_step_is_skipped_and_counted(tiny_model, laion_data, tmp_path):
    out = tmp_path / "r"
    res = train(make_config(tiny_model, laion_data, out, max_steps=4, checkpoint_every=0),
                hooks=TrainHooks(after_loss=nan_loss(at_step=2, count=1)))
    assert res.bad_steps == 1 and res.global_step == 4
    assert all(v == v for _, v in res.losses)  # no NaN in the recorded losses
    # checkpoint_every=0: no intermediate checkpoints, but the last step gets one and the final model is written
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-4"]
    assert (out / "final" / "model_index.json").is_file()


def test_consecutive_nans_stop_the_run_cli(tiny_model, laion_data, tmp_path, capsys, monkeypatch):
    import functools

    from ldm_pipeline.cli.train import main
    from ldm_pipeline.training import loop

    monkeypatch.setattr(loop, "train", functools.partial(loop.train, hooks=TrainHooks(after_loss=nan_loss(3, 100))))
    out = tmp_path / "r"
    rc = main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "--output-dir",
               str(out), "max_steps=6", "checkpoint_every=2", "max_bad_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and "NaN/inf" in err[0] and "checkpoint-2" in err[0]
    assert (out / "checkpoint-2" / "pipeline" / "model_index.json").is_file()  # last good checkpoint intact
    assert not (out / "final").exists()


def test_diverged_is_an_exception(tiny_model, laion_data, tmp_path):
    with pytest.raises(TrainingDiverged):
        train(make_config(tiny_model, laion_data, tmp_path / "r", max_steps=3, checkpoint_every=0, max_bad_steps=2),
              hooks=TrainHooks(after_loss=nan_loss(at_step=1, count=9)))


def test_lora_changes_txt2img_and_loads(tiny_model, laion_data, tmp_path):
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    out = tmp_path / "lora"
    res = train(make_config(tiny_model, laion_data, out, max_steps=6, checkpoint_every=3, learning_rate=1e-2,
                            train_text_encoder=False, lora__rank=4))
    final = out / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "README.md").is_file()
    card = (final / "README.md").read_text()
    assert "LoRA adapters (rank 4) on the UNet," in card and "full fine-tune" not in card
    assert (out / "final_raw" / "pytorch_lora_weights.safetensors").is_file()  # tiny_test has EMA on: raw weights
    assert (out / "checkpoint-3" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # checkpoints hold only the adapters, not the frozen base
    from safetensors.torch import load_file

    assert all("lora" in k for k in load_file(out / "checkpoint-3" / "model.safetensors"))
    assert res.global_step == 6
    import numpy as np

    kw = dict(seed=3, num_inference_steps=4, guidance_scale=1.0, height=32, width=32)
    base = Generator.load(str(tiny_model), RuntimeOptions(device="cpu")).txt2img("sample 1, tag1", **kw)[0]
    tuned = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", lora=[str(final)])).txt2img(
        "sample 1, tag1", **kw)[0]
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(tuned, dtype=int)).max() > 0


def test_cached_latents_with_flip_dropout_vpred_snr(tiny_model, laion_data, tmp_path):
    out = tmp_path / "cached"
    cfg = make_config(tiny_model, laion_data, out, max_steps=30, checkpoint_every=0, cache_latents=True,
                      train_text_encoder=False, data__random_flip=True, data__caption_dropout=0.2,
                      prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.05)
    res = train(cfg)
    losses = [v for _, v in res.losses]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    manifest = json.loads((out / "cache" / "rank0of1" / "manifest.json").read_text())
    assert manifest["count"] == 16 and manifest["flip"] and manifest["embeds"]
    from safetensors import safe_open

    with safe_open(str(out / "cache" / "rank0of1" / manifest["shards"][0]), framework="pt") as f:
        assert {"latent_mean", "latent_std", "latent_mean_flip", "prompt_embeds", "input_ids"} <= set(f.keys())
    sched = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # the saved model samples the way it was trained


def test_cache_is_reused_by_a_run_continuing_from_a_trained_unet(tiny_model, laion_data, tmp_path):
    """The cache depends on the VAE and tokenizer (and a frozen text encoder), not on the UNet: a second run from
    the first run's output, with the same cache_dir, must not re-encode; a different VAE must."""
    import torch

    from ldm_pipeline.training import caching

    cache = tmp_path / "cache"
    kw = dict(max_steps=2, checkpoint_every=0, cache_latents=True, train_text_encoder=False, cache_dir=str(cache))
    train(make_config(tiny_model, laion_data, tmp_path / "a", **kw))
    manifest = cache / "rank0of1" / "manifest.json"
    first = manifest.stat().st_mtime_ns
    train(make_config(tmp_path / "a" / "final", laion_data, tmp_path / "b", **kw))  # new UNet, same encoders
    assert manifest.stat().st_mtime_ns == first

    from ldm_pipeline.models import load_pipeline

    pipe, _ = load_pipeline(str(tiny_model))
    base = caching.encoders_hash(pipe.vae, pipe.text_encoder, pipe.tokenizer, cache_embeddings=False)
    assert base == caching.encoders_hash(pipe.vae, None, pipe.tokenizer, cache_embeddings=False)  # TE not cached
    with torch.no_grad():
        next(pipe.vae.parameters()).add_(1e-3)
    assert caching.encoders_hash(pipe.vae, pipe.text_encoder, pipe.tokenizer, cache_embeddings=False) != base


def test_ema_averages_the_text_encoder_trained_with_the_unet(tiny_model, laion_data, tmp_path):
    """With the text encoder trained, final/ pairs the EMA UNet with the EMA text encoder (not the raw one)."""
    from tests.training.conftest import load_weights

    out = tmp_path / "ema_te"
    train(make_config(tiny_model, laion_data, out, max_steps=3, checkpoint_every=0, learning_rate=1e-2,
                      train_text_encoder=True, ema__enabled=True, ema__decay=0.5, ema__update_after_step=0))
    ema, raw, init = load_weights(out / "final"), load_weights(out / "final_raw"), load_weights(tiny_model)
    for comp in ("unet/", "text_encoder/"):
        changed = [k for k in raw if k.startswith(comp) and not bool((raw[k] == init[k]).all())]
        assert changed, comp  # trained
        assert any(not bool((ema[k] == raw[k]).all()) for k in changed), comp  # and averaged
    assert "EMA weights of the UNet and text encoder" in (out / "final" / "README.md").read_text()


def test_text_encoder_has_its_own_learning_rate(tiny_model, laion_data, tmp_path):
    """text_encoder_learning_rate moves the text encoder at its own rate: with AdamW (steps of about the rate
    whatever the gradient) the largest change per weight is about max_steps × rate, for each model separately."""
    from tests.training.conftest import load_weights

    out = tmp_path / "te_lr"
    train(make_config(tiny_model, laion_data, out, max_steps=2, checkpoint_every=0, learning_rate=1e-2,
                      text_encoder_learning_rate=1e-5, lr_warmup_steps=0, lr_scheduler="constant",
                      adam_weight_decay=0.0, train_text_encoder=True, ema__enabled=False))
    final, init = load_weights(out / "final"), load_weights(tiny_model)

    def moved(comp: str) -> float:
        return max(float((final[k] - init[k]).abs().max()) for k in final if k.startswith(comp))

    assert 5e-3 < moved("unet/") <= 2.1e-2
    assert 0 < moved("text_encoder/") <= 2.1e-5


def test_lora_with_ema_saves_the_ema_adapters(tiny_model, laion_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora_ema"
    train(make_config(tiny_model, laion_data, out, max_steps=3, checkpoint_every=3, learning_rate=1e-2,
                      train_text_encoder=False, lora__rank=4, ema__enabled=True, ema__decay=0.9))
    weights = {name: load_file(path / "pytorch_lora_weights.safetensors") for name, path in [
        ("final", out / "final"), ("final_raw", out / "final_raw"), ("ema", out / "checkpoint-3" / "lora_ema"),
        ("raw", out / "checkpoint-3" / "lora")]}
    same = lambda a, b: all(bool((weights[a][k] == weights[b][k]).all()) for k in weights[a])  # noqa: E731
    assert weights["final"].keys() == weights["final_raw"].keys()
    assert same("final", "ema") and same("final_raw", "raw") and not same("final", "final_raw")
    assert "EMA weights of the UNet adapters" in (out / "final" / "README.md").read_text()


def test_bf16_from_accelerate_launch_validates_with_live_modules(tiny_model, laion_data, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16 --gradient_accumulation_steps 1` on CPU: validation samples with
    the live (bf16 VAE, fp32 trained) modules on the accelerator's device; saving uses the fp32 copies."""
    import torch
    from safetensors.torch import load_file

    from ldm_pipeline.training import validation

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    seen = []
    real = validation.sample_images

    def spy(pipe, info, settings, height, width, device):
        seen.append({name: (getattr(pipe, name).device.type, getattr(pipe, name).dtype)
                     for name in ("unet", "vae", "text_encoder")})
        seen[-1]["device"] = device
        return real(pipe, info, settings, height, width, device)

    monkeypatch.setattr(validation, "sample_images", spy)
    out = tmp_path / "bf16"
    res = train(make_config(tiny_model, laion_data, out, mixed_precision="auto", max_steps=2, validate_every=2,
                            checkpoint_every=0))
    assert seen == [{"unet": ("cpu", torch.float32), "vae": ("cpu", torch.bfloat16),
                     "text_encoder": ("cpu", torch.float32), "device": "cpu"}]  # the live, cast VAE
    assert (out / "samples" / "step-0000002.png").is_file()
    assert res.samples_seen == 2 * 2 * 1  # accumulation from accelerate's setting, not the config's 2
    assert "gradient_accumulation_steps: 1" in (out / "train_config.yaml").read_text()
    saved, base = (load_file(next((d / "vae").glob("*.safetensors"))) for d in (out / "final", tiny_model))
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], base[k]) for k in base)  # fp32, unchanged


def test_model_predicting_sample_is_refused(tiny_model, laion_data, tmp_path):
    import shutil

    from ldm_pipeline.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"epsilon"', '"sample"'))
    assert '"sample"' in sched.read_text()
    with pytest.raises(UserError, match="prediction_type.*'sample'"):
        train(make_config(model, laion_data, tmp_path / "r", max_steps=1))


def test_resume_from_an_older_checkpoint_abandons_later_ones(tiny_model, laion_data, tmp_path):
    from ldm_pipeline.training import checkpoints as ckpt

    out = tmp_path / "r"
    train(make_config(tiny_model, laion_data, out, max_steps=4, checkpoint_every=2, checkpoints_total_limit=2))
    res = train(make_config(tiny_model, laion_data, out, max_steps=3, checkpoint_every=2, checkpoints_total_limit=2,
                            resume=str(out / "checkpoint-2")))
    assert res.global_step == 3
    assert [s for s, _ in ckpt.checkpoint_dirs(out)] == [2, 3]  # the new one kept, the stale future not counted
    assert ckpt.latest_checkpoint(out).name == "checkpoint-3"
    abandoned = [p.name for p in out.iterdir() if ".abandoned-" in p.name]
    assert len(abandoned) == 1 and abandoned[0].startswith("checkpoint-4.abandoned-")
