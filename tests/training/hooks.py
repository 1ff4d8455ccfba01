"""Test hooks for `train(config, hooks=...)`, and `python -m tests.training.hooks ARGS`: `ldm ARGS` with the hooks
named in $LDM_TEST_HOOKS (JSON, e.g. {"sleep": 0.3, "sample_keys": true}) installed, for tests that run training in
a subprocess (SIGKILL, torchrun). The package knows nothing of this variable: only this module reads it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ldm_pipeline.training.step import TrainHooks

ENV = "LDM_TEST_HOOKS"


def nan_loss(at_step: int, count: int = 1):
    """after_loss: a NaN loss on the first `count` attempts at optimizer step `at_step` (1-based)."""

    def after_loss(state, loss):
        if state.global_step + 1 == at_step and state.bad_in_a_row < count:
            return loss * float("nan")
        return loss

    return after_loss


def sleep(seconds: float):
    """after_step: slow each step down, so a test can kill a run between checkpoints."""
    return lambda state: time.sleep(seconds)


def sample_keys(output_dir: str | Path, rank: int):
    """on_batch: append each micro-batch's sample keys to OUTPUT_DIR/debug/sample_keys.rankN.jsonl."""
    path = Path(output_dir) / "debug" / f"sample_keys.rank{rank}.jsonl"

    def on_batch(state, batch):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step + 1, "keys": list(batch["keys"])}) + "\n")

    return on_batch


def weight_digests(run, state) -> None:
    """on_end: OUTPUT_DIR/debug/weights.rankN.json, the sha256 of the trained (and EMA) weights on this rank."""
    import hashlib

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    digests = {"trained": digest(run.trained_params)}
    if run.ema is not None:
        digests["ema"] = digest(run.ema.shadow_params)
    path = run.out / "debug" / f"weights.rank{run.accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(digests))


def from_spec(spec: dict, output_dir: str | Path, rank: int) -> TrainHooks:
    hooks = TrainHooks()
    if spec.get("sleep"):
        hooks.after_step = sleep(float(spec["sleep"]))
    if spec.get("nan_at_step"):
        hooks.after_loss = nan_loss(int(spec["nan_at_step"]), int(spec.get("nan_count", 1)))
    if spec.get("sample_keys"):
        hooks.on_batch = sample_keys(output_dir, rank)
        hooks.on_end = weight_digests
    return hooks


def main(argv: list[str]) -> int:
    from ldm_pipeline.cli import main as ldm_main
    from ldm_pipeline.training import loop

    spec = json.loads(os.environ.get(ENV, "{}"))
    real_train = loop.train

    def train(config, hooks=None):
        rank = int(os.environ.get("RANK", "0"))
        return real_train(config, hooks or from_spec(spec, config.output_dir, rank))

    loop.train = train  # cli/train.py looks it up at call time
    return ldm_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
