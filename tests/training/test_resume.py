"""Exact resume: a run SIGKILLed mid-training and resumed with --resume latest ends with the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ldm_pipeline.training import train
from tests.training.conftest import cli_env, load_weights, make_config, max_abs_diff

STEPS, EVERY = 8, 3
COMMON = dict(max_steps=STEPS, checkpoint_every=EVERY, data__num_workers=2, data__random_flip=True,
              data__caption_dropout=0.1, snr_gamma=5.0, noise_offset=0.05)


def test_sigkill_then_resume_latest_matches_uninterrupted(tiny_model, laion_data, tmp_path):
    ref = tmp_path / "ref"
    train(make_config(tiny_model, laion_data, ref, **COMMON))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ldm_pipeline", "train", "--config", "tiny_test", "--model", str(tiny_model),
           "--data", str(laion_data), "--output-dir", str(out), f"max_steps={STEPS}", f"checkpoint_every={EVERY}",
           "data.num_workers=2", "data.random_flip=true", "data.caption_dropout=0.1", "snr_gamma=5.0",
           "noise_offset=0.05", "debug_sleep=0.3"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
