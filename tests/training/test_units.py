"""Small pieces: loss targets and weights, checkpoint bookkeeping, the loss-curve PNG."""

from __future__ import annotations

import torch

from ldm_pipeline.training import checkpoints as ckpt
from ldm_pipeline.training import losses


def _scheduler(kind="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=kind)


def test_targets_and_min_snr():
    from diffusers.training_utils import compute_snr

    x, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    eps, v = _scheduler("epsilon"), _scheduler("v_prediction")
    assert torch.equal(losses.target_for(eps, x, n, t), n)
    assert torch.allclose(losses.target_for(v, x, n, t), v.get_velocity(x, n, t))
    snr = compute_snr(eps, t)
    w = losses.min_snr_weights(eps, t, 5.0)
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 1 and torch.isclose(w[2], torch.tensor(1.0))  # low t (high SNR) is down-weighted
    assert torch.allclose(losses.min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))


def test_noise_is_reproducible_from_generator_state():
    g = torch.Generator().manual_seed(0)
    lat = torch.zeros(2, 4, 8, 8)
    state = g.get_state()
    a = losses.sample_noise(lat, g, noise_offset=0.1)
    g.set_state(ckpt.decode_bytes(ckpt.encode_bytes(state)))
    assert torch.equal(a, losses.sample_noise(lat, g, noise_offset=0.1))


def test_timestep_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    uniform = losses.sample_timesteps(20_000, 1000, g, "cpu")
    state = g.get_state()
    centred = losses.sample_timesteps(20_000, 1000, g, "cpu", "logit_normal", 0.0, 1.0)
    g.set_state(state)
    assert torch.equal(centred, losses.sample_timesteps(20_000, 1000, g, "cpu", "logit_normal", 0.0, 1.0))
    noisy = losses.sample_timesteps(20_000, 1000, g, "cpu", "logit_normal", 1.0, 1.0)
    for t in (uniform, centred, noisy):
        assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    middle = lambda t: ((t >= 300) & (t < 700)).float().mean().item()  # noqa: E731
    assert abs(middle(uniform) - 0.4) < 0.02
    assert middle(centred) > 0.55  # sigmoid(N(0, 1)): 57 % of its mass in [0.3, 0.7)
    assert abs(centred.float().mean().item() - 500) < 10
    assert noisy.float().mean().item() > 650  # a positive mean moves the steps towards noise


def test_latest_ignores_half_written_and_prune(tmp_path):
    for step in (2, 4, 6):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / ".checkpoint-8.tmp").mkdir()  # killed mid-save
    (tmp_path / "checkpoint-10").mkdir()  # no state file: not a complete checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert [p.name for p in ckpt.prune(tmp_path, 2)] == ["checkpoint-2"]
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [4, 6]
    ckpt.remove_stale_tmp(tmp_path)
    assert not (tmp_path / ".checkpoint-8.tmp").exists()


def test_loss_curve_png(tmp_path):
    from PIL import Image

    from ldm_pipeline.training.validation import draw_loss_curve

    p = draw_loss_curve(list(range(1, 31)), [1 / s for s in range(1, 31)], tmp_path / "loss.png")
    with Image.open(p) as im:
        assert im.size == (800, 400)


def test_resume_sets_aside_the_abandoned_future(tmp_path):
    import json

    for step in (100, 200, 300):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
    assert ckpt.checkpoint_step(tmp_path / "checkpoint-100") == 100
    moved = ckpt.set_aside_future(tmp_path, 100)
    assert sorted(p.name.split(".")[0] for p in moved) == ["checkpoint-200", "checkpoint-300"]
    assert all(".abandoned-" in p.name and p.is_dir() for p in moved)  # kept, renamed
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-100"  # latest ignores them
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-100"
    new = tmp_path / "checkpoint-150"
    new.mkdir()
    (new / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 150}))
    assert ckpt.prune(tmp_path, 1, protect=new) == [tmp_path / "checkpoint-100"]
    assert new.is_dir() and all(p.is_dir() for p in moved)  # the limit never counts abandoned ones
    older = tmp_path / "checkpoint-50"
    older.mkdir()
    (older / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 50}))
    assert ckpt.prune(tmp_path, 1, protect=older) == [new]  # never the one just written, even if not the newest


def test_warmup_stable_decay_schedule():
    """Full rate after the warm-up until the last lr_decay_steps, then a fall towards 0 (transformers' WSD)."""
    from ldm_pipeline.training.config import TrainConfig
    from tests.training.conftest import lr_rates

    config = TrainConfig(max_steps=20, lr_warmup_steps=2, lr_scheduler="warmup_stable_decay", lr_decay_steps=5)
    *rates, after = lr_rates(config, peak=0.5, steps=config.max_steps + 1)  # `after`: the rate once the run is over
    assert rates[:2] == [0.0, 0.25]
    assert rates[2:16] == [0.5] * 14  # the decay's first step is still at the full rate (cosine of 0)
    assert all(a > b for a, b in zip(rates[15:], rates[16:]))  # then strictly falling
    assert 0 < rates[-1] < 0.1 and after == 0.0
