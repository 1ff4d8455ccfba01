"""Exact resume: a run SIGKILLed mid-training and resumed with --resume latest ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_pipeline.training import train
from tests.training.conftest import cli_env, load_weights, make_config, max_abs_diff

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 3
COMMON = dict(max_steps=STEPS, checkpoint_every=EVERY, data__num_workers=2, data__random_flip=True,
              data__caption_dropout=0.1, snr_gamma=5.0, noise_offset=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_xl_model"])
def test_sigkill_then_resume_latest_matches_uninterrupted(model_fixture, laion_data, tmp_path, request):
    tiny_model = request.getfixturevalue(model_fixture)  # SD, and SDXL (both text encoders trained)
    ref = tmp_path / "ref"
    train(make_config(tiny_model, laion_data, ref, **COMMON))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests.training.hooks", "train", "--config", "tiny_test", "--model", str(tiny_model),
           "--data", str(laion_data), "--output-dir", str(out), f"max_steps={STEPS}", f"checkpoint_every={EVERY}",
           "data.num_workers=2", "data.random_flip=true", "data.caption_dropout=0.1", "snr_gamma=5.0",
           "noise_offset=0.05"]
    env = {**cli_env(), "LDM_TEST_HOOKS": json.dumps({"sleep": 0.3}), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out / f"checkpoint-{EVERY}").is_dir():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.4)  # mid-way between checkpoints
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()

    res = train(make_config(tiny_model, laion_data, out, resume="latest", **COMMON))
    assert res.global_step == STEPS and res.samples_seen == STEPS * 4
    for folder in ("final", "final_raw"):  # EMA weights and raw weights
        diff = max_abs_diff(load_weights(ref / folder), load_weights(out / folder))
        assert diff <= 1e-6, (folder, diff)


def test_resume_refuses_another_model_caching_or_config_unless_allowed(tiny_model, laion_data, tmp_path, capsys):
    """Each refusal is one line, exit 2, before anything in the output dir changes; --allow-resume-changes lets a
    deliberate change through."""
    import shutil

    from ldm_pipeline.cli.train import main

    out = tmp_path / "r"
    train(make_config(tiny_model, laion_data, out, max_steps=2, checkpoint_every=0, train_text_encoder=False))
    other = tmp_path / "other"
    shutil.copytree(out / "final", other)  # the same architecture, other weights
    base = ["--config", "tiny_test", "--data", str(laion_data), "--output-dir", str(out), "--resume", "latest",
            "--max-steps", "3", "train_text_encoder=false"]
    capsys.readouterr()
    for extra, expected in [(["--model", str(other)], "different one (hash"),
                            (["--model", str(tiny_model), "--cache-latents"], "cache_latents=False, this run has"),
                            (["--model", str(tiny_model), "--lr", "1e-2"], "learning_rate: 0.001 -> 0.01"),
                            (["--model", str(tiny_model), "seed=1"], "seed: 0 -> 1")]:
        rc = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0] and "--allow-resume-changes" in err[0], (extra, err)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert main(base + ["--model", str(tiny_model), "seed=1", "--allow-resume-changes"]) == 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
