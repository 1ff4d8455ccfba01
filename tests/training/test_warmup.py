"""The learning-rate warm-up fits the run: a default that cannot eat a short run, --lr-warmup-steps, and one warning
line when a given warm-up is not shorter than the run."""

from __future__ import annotations

import pytest

from ldm_pipeline.errors import UserError
from ldm_pipeline.training.config import load_train_config, resolve, warmup_warning
from tests.training.conftest import lr_rates

BASE = {"model": "m", "data": {"source": "d"}}


def _resolved(tmp_path, **layer):
    return resolve(load_train_config(None, {**BASE, "output_dir": str(tmp_path)}, layer))


def test_default_warmup_lets_a_short_run_reach_its_rate(tmp_path):
    """`ldm train --max-steps 40` with the defaults: the warm-up used to be 500 steps, so the rate never passed 8e-6
    of 1e-4 (LoRA) and the model hardly moved."""
    cfg = _resolved(tmp_path, max_steps=40, lora={"rank": 4})
    assert cfg.lr_warmup_steps == 4  # 10 % of the run
    assert max(lr_rates(cfg)) == pytest.approx(1e-4)
    assert warmup_warning(cfg, 1e-4) is None
    assert _resolved(tmp_path, max_steps=10_000).lr_warmup_steps == 500  # long runs keep the old 500
    assert _resolved(tmp_path, max_steps=40, lr_scheduler="constant").lr_warmup_steps == 0  # it has none


def test_a_given_warmup_is_kept_and_warned_about(tmp_path):
    cfg = _resolved(tmp_path, max_steps=40, lr_warmup_steps=500, lora={"rank": 4})
    assert cfg.lr_warmup_steps == 500  # the user's choice stands
    rates = lr_rates(cfg)
    warning = warmup_warning(cfg, 1e-4)
    assert warning is not None and "\n" not in warning
    assert "lr_warmup_steps 500" in warning and "max_steps 40" in warning and "--lr-warmup-steps 4" in warning
    assert f"{max(rates):.2g}" == "7.8e-06" and "only reaches 7.8e-06 instead of 0.0001" in warning
    # the last step runs at the peak's (max_steps - 1) / warm-up: a warm-up as long as the run is reported too
    assert warmup_warning(_resolved(tmp_path, max_steps=40, lr_warmup_steps=40), 1e-4) is not None
    assert warmup_warning(_resolved(tmp_path, max_steps=40, lr_warmup_steps=39), 1e-4) is None
    assert warmup_warning(_resolved(tmp_path, max_steps=4, lr_warmup_steps=9, lr_scheduler="constant"), 1) is None


def test_warmup_stable_decay_needs_warmup_and_decay_within_the_run(tmp_path):
    cfg = _resolved(tmp_path, max_steps=100, lr_scheduler="warmup_stable_decay", lr_decay_steps=50)
    assert cfg.lr_warmup_steps == 10  # the default warm-up leaves the decay room
    with pytest.raises(UserError, match=r"lr_decay_steps 50 \+ lr_warmup_steps 500 must fit in max_steps 100"):
        _resolved(tmp_path, max_steps=100, lr_scheduler="warmup_stable_decay", lr_decay_steps=50, lr_warmup_steps=500)


def test_an_extended_run_keeps_its_warmup(tmp_path):
    """Resuming a 30-step run with --max-steps 1000: the default warm-up would now be 100 steps and pull the rate at
    step 30 back to 30 %; the resumed run keeps the warm-up it started with (one given now still wins)."""
    import json

    from ldm_pipeline.config import save_yaml
    from ldm_pipeline.training import checkpoints as ckpt

    first = _resolved(tmp_path, max_steps=30)
    checkpoint = tmp_path / "checkpoint-30"
    checkpoint.mkdir()
    save_yaml(first, checkpoint / ckpt.CONFIG_FILE)
    (checkpoint / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 30}))
    assert first.lr_warmup_steps == 3
    assert _resolved(tmp_path, max_steps=1000, resume="latest").lr_warmup_steps == 3
    assert _resolved(tmp_path, max_steps=1000, resume=str(checkpoint)).lr_warmup_steps == 3
    assert _resolved(tmp_path, max_steps=1000, resume="latest", lr_warmup_steps=50).lr_warmup_steps == 50
    assert _resolved(tmp_path, max_steps=1000).lr_warmup_steps == 100  # a new run


def test_lr_warmup_steps_flag(tmp_path):
    from ldm_pipeline.cli.train import build_parser, config_from_args

    args = build_parser().parse_args(["--config", "tiny_test", "--data", "d", "--output-dir", str(tmp_path),
                                      "--lr-warmup-steps", "7"])
    assert config_from_args(args).lr_warmup_steps == 7
    assert "--lr-warmup-steps" in build_parser().format_help()


def test_run_warns_once_on_stderr(tiny_model, laion_data, tmp_path, capsys):
    from ldm_pipeline.cli.train import main

    rc = main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "--output-dir",
               str(tmp_path / "r"), "--max-steps", "2", "--lr-warmup-steps", "5", "--checkpoint-every", "0",
               "--report-to", "none", "gradient_accumulation_steps=1", "train_text_encoder=false"])
    assert rc == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "ldm train: warning: lr_warmup_steps 5 is not shorter than the run (max_steps 2): the learning rate only "
        "reaches 0.0002 instead of 0.001; pass e.g. --lr-warmup-steps 0"]
