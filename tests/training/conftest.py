"""Fixtures for training tests: a tiny LAION-style dataset and a helper building the tiny_test config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ldm_pipeline.training.config import TrainConfig, load_train_config


@pytest.fixture(scope="session")
def laion_data(tmp_path_factory) -> Path:
    """16 clean img2dataset-style samples in 2 webdataset shards."""
    from tests.fixtures import write_laion_fixture

    out = tmp_path_factory.mktemp("laion")
    write_laion_fixture(out, n=16, shards=2)
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_config(model, data, out, **overrides) -> TrainConfig:
    """tiny_test with model/data/output_dir set, plus dotted-key overrides (``data__random_flip`` → data.random_flip)."""
    layer: dict = {"model": str(model), "output_dir": str(out), "data": {"source": str(data)}}
    for k, v in overrides.items():
        node = layer
        parts = k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return load_train_config("tiny_test", layer)


def load_weights(folder: Path) -> dict:
    """All tensors of a diffusers folder's unet and text_encoder, keyed by component/name."""
    from safetensors.torch import load_file

    out = {}
    for comp in ("unet", "text_encoder"):
        for f in sorted((folder / comp).glob("*.safetensors")):
            out.update({f"{comp}/{k}": v for k, v in load_file(f).items()})
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


REPO = Path(__file__).resolve().parents[2]


def run_torchrun_hooked(hooks: dict, *args: str, cwd: Path | None = None, timeout: int = 300):
    """`ldm ARGS` on 2 CPU ranks (torchrun + gloo) as `tests.conftest.run_torchrun` runs it, with the training hooks
    of `hooks` (see tests/training/hooks.py) installed in every rank; a hang is killed with its process group."""
    import json
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.training.hooks", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "LDM_TEST_HOOKS": json.dumps(hooks)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ldm {' '.join(args[:3])} ... hung for {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
