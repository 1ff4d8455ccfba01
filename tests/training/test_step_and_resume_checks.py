"""The loop's parts without a training job: `train_step`'s skip rules, `TrainState` round trip, resume refusals."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from ldm_pipeline.errors import UserError
from ldm_pipeline.training import checkpoints as ckpt
from ldm_pipeline.training import step as step_mod
from ldm_pipeline.training.setup import Data
from ldm_pipeline.training.state import TrainState
from ldm_pipeline.training.step import TrainHooks, train_step


class FakeAccelerator:
    """What train_step uses of an Accelerator; `skip_next` plays fp16's grad scaler finding inf/NaN gradients."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def __init__(self):
        self.skip_next = False
        self.optimizer_step_was_skipped = False

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class ScaledOptimizer(torch.optim.SGD):
    """SGD whose step is skipped (no update) when the accelerator says the scaler skipped it, as GradScaler does."""

    def __init__(self, params, accelerator):
        super().__init__(params, lr=0.1)
        self.accelerator = accelerator

    def step(self, closure=None):
        self.accelerator.optimizer_step_was_skipped = self.accelerator.skip_next
        if not self.accelerator.skip_next:
            super().step(closure)


class CountingEMA:
    def __init__(self):
        self.steps = 0

    def step(self, params):
        self.steps += 1


def _fake_run(monkeypatch):
    weight = torch.nn.Parameter(torch.ones(3))
    accelerator = FakeAccelerator()
    optimizer = ScaledOptimizer([weight], accelerator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    config = SimpleNamespace(gradient_accumulation_steps=2, max_grad_norm=1.0)
    run = SimpleNamespace(accelerator=accelerator, config=config, trained=(), trained_params=[weight],
                          optimizer=optimizer, lr_scheduler=scheduler, ema=CountingEMA())
    monkeypatch.setattr(step_mod, "compute_loss", lambda run, batch, gen: (weight ** 2).sum())
    batches = ({"keys": ["a", "b"], "state": {"epoch": 0, "index": i}} for i in range(100))
    return run, Data(batches), weight


def test_a_step_the_grad_scaler_skipped_is_not_a_step(monkeypatch):
    run, data, weight = _fake_run(monkeypatch)
    state = TrainState(noise_generator=torch.Generator())
    run.accelerator.skip_next = True
    result = train_step(run, data, state)
    assert result.skipped == "scaler" and result.loss == pytest.approx(3.0)
    assert state.global_step == 0 and state.samples_seen == 0 and state.losses == [] and state.scaler_skips == 1
    assert run.lr_scheduler.last_epoch == 0 and run.ema.steps == 0 and torch.equal(weight, torch.ones(3))
    assert weight.grad is None  # not carried into the next window
    assert data.position() == {"epoch": 0, "index": 1}  # the data moved on all the same
    run.accelerator.skip_next = False
    result = train_step(run, data, state)
    assert result.skipped is None and state.global_step == 1 and state.samples_seen == 4
    assert run.lr_scheduler.last_epoch == 1 and run.ema.steps == 1 and not torch.equal(weight, torch.ones(3))
    assert state.losses == [(1, pytest.approx(3.0))]


def test_a_nan_loss_is_skipped_and_counted_in_a_row(monkeypatch):
    run, data, _ = _fake_run(monkeypatch)
    state = TrainState(noise_generator=torch.Generator())
    nan = TrainHooks(after_loss=lambda s, loss: loss * float("nan"))
    for n in (1, 2):
        result = train_step(run, data, state, nan)
        assert result.skipped == "nan" and result.loss is None
        assert state.bad_in_a_row == n and state.bad_steps == n and state.global_step == 0
    assert run.lr_scheduler.last_epoch == 0 and run.ema.steps == 0
    train_step(run, data, state)
    assert state.bad_in_a_row == 0 and state.bad_steps == 2 and state.global_step == 1


def test_train_state_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    state = TrainState(global_step=7, samples_seen=28, bad_steps=2, bad_in_a_row=1, scaler_skips=3, data_epoch=1,
                       losses=[(6, 0.5), (7, 0.25)], data={"epoch": 1, "index": 3}, noise_generator=gen)
    (tmp_path / "rank_states").mkdir()
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps(state.shared_dict(1, {"model": "m"})))
    (tmp_path / "rank_states" / "rank0.json").write_text(json.dumps(state.rank_dict()))
    expected = torch.rand(4, generator=gen)
    loaded = TrainState(noise_generator=torch.Generator())
    loaded.load(tmp_path, 0, 1)
    assert torch.equal(torch.rand(4, generator=loaded.noise_generator), expected)
    loaded.noise_generator = state.noise_generator = None
    assert loaded == state


def _checkpoint(tmp_path, config: dict, model_hash="aaa", cache_latents=False, data=None):
    import yaml

    ck = tmp_path / "checkpoint-2"
    (ck / "rank_states").mkdir(parents=True)
    state = {"global_step": 2, "samples_seen": 8, "bad_steps": 0, "world_size": 1, "losses": [], "model": "m",
             "model_hash": model_hash}
    if cache_latents is not None:
        state["cache_latents"] = cache_latents
    (ck / ckpt.STATE_FILE).write_text(json.dumps(state))
    (ck / "rank_states" / "rank0.json").write_text(json.dumps({"data": data, "noise_generator": ""}))
    (ck / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(config))
    return ck


CONFIG = {"model": "m", "learning_rate": 1e-4, "max_steps": 10, "checkpoint_every": 2, "output_dir": "a",
          "cache_latents": False, "data": {"source": "d", "resolution": 64}, "validation": {"prompts": ["x"]}}


def test_resume_refuses_another_model(tmp_path):
    ck = _checkpoint(tmp_path, CONFIG, model_hash="aaa")
    ckpt.check_resume(ck, ckpt.CONFIG_FILE, CONFIG, "aaa", False)
    with pytest.raises(UserError, match=r"hash aaa.*different one \(hash bbb\).*--allow-resume-changes") as e:
        ckpt.check_resume(ck, ckpt.CONFIG_FILE, CONFIG, "bbb", False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("saved, data", [(True, None), (False, None), (None, {"epoch": 0, "index": 4}),
                                         (None, {"workers": {}, "num_workers": 0})])
def test_resume_refuses_a_cache_latents_toggle(tmp_path, saved, data):
    """Either way round; checkpoints from before the state recorded it are told apart by their data position."""
    ck = _checkpoint(tmp_path, CONFIG, cache_latents=saved, data=data)
    was_cached = saved if saved is not None else "index" in data
    ckpt.check_resume(ck, ckpt.CONFIG_FILE, {**CONFIG, "cache_latents": was_cached}, "aaa", was_cached)
    with pytest.raises(UserError, match=f"cache_latents={was_cached}, this run has cache_latents={not was_cached}"):
        ckpt.check_resume(ck, ckpt.CONFIG_FILE, {**CONFIG, "cache_latents": not was_cached}, "aaa", not was_cached)


def test_resume_refuses_a_changed_training_config_but_not_schedule_or_paths(tmp_path):
    ck = _checkpoint(tmp_path, CONFIG)
    allowed = {**CONFIG, "max_steps": 50, "checkpoint_every": 5, "output_dir": "b", "validation": {"prompts": []},
               "new_field": 1}
    ckpt.check_resume(ck, ckpt.CONFIG_FILE, allowed, "aaa", False)
    changed = {**CONFIG, "learning_rate": 1e-3, "data": {"source": "d", "resolution": 32}}
    with pytest.raises(UserError, match=r"data.resolution: 64 -> 32; learning_rate: 0.0001 -> 0.001"):
        ckpt.check_resume(ck, ckpt.CONFIG_FILE, changed, "aaa", False)


def test_deterministic_runs_turn_on_deterministic_kernels_and_may_be_resumed_without(tiny_model, laion_data,
                                                                                      tmp_path, monkeypatch):
    from ldm_pipeline.training import train
    from tests.training.conftest import make_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        train(make_config(tiny_model, laion_data, tmp_path / "d", max_steps=1, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs for it
    finally:
        torch.use_deterministic_algorithms(False)
    # switching it is not a change of what is trained: the resume check lets it through
    assert ckpt.config_changes({"deterministic": True, "seed": 0}, {"deterministic": False, "seed": 0}) == []
