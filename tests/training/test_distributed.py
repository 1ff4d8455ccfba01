"""Two CPU processes (torchrun + gloo): disjoint data, identical weights on every rank, exact resume."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_torchrun
from tests.training.conftest import load_weights, max_abs_diff


def _torchrun(*args, cwd):
    # the sample-keys hook writes each rank's batches and final weight digests to OUTPUT_DIR/debug/
    r = run_torchrun("train", *args, cwd=cwd, timeout=240, hooks={"sample_keys": True})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_processes(tiny_model, laion_data, tmp_path):
    common = ["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "checkpoint_every=4",
              "data.random_flip=true"]
    a = tmp_path / "a"
    _torchrun(*common, "--output-dir", str(a), "max_steps=8", cwd=tmp_path)
    # every rank read its own samples: within the first epoch (2 steps x 2 micro-batches x 2 per rank) disjoint,
    # and together all 16
    keys = {}
    for r in (0, 1):
        rows = [json.loads(line) for line in (a / "debug" / f"sample_keys.rank{r}.jsonl").read_text().splitlines()]
        assert sum(len(x["keys"]) for x in rows) == 8 * 4
        keys[r] = {k for x in rows if x["step"] <= 2 for k in x["keys"]}
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 16
    # identical weights (and EMA) on both ranks
    w0, w1 = (json.loads((a / "debug" / f"weights.rank{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["samples_seen"] == 8 * 8
    losses = [v for _, v in metrics["losses"]]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    # resume from the step-4 checkpoint with 2 processes into a new dir: same final weights as the straight run
    b = tmp_path / "b"
    _torchrun(*common, "--output-dir", str(b), "max_steps=8", "--resume", str(a / "checkpoint-4"), cwd=tmp_path)
    for folder in ("final", "final_raw"):
        assert max_abs_diff(load_weights(a / folder), load_weights(b / folder)) <= 1e-6
