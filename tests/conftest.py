"""Shared fixtures: a tiny random model built from configs/models/tiny.yaml, offline settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may touch the network at test time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.pop("LDM_MODEL", None)


def pytest_collection_modifyitems(config, items):
    """The slow tier (torchrun, SIGKILL resume, whole recipes) runs after every behaviour test, so a full run reports
    the fast tier's failures first; `-m "not slow"` leaves it out."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: keeps each tier's order


def pytest_report_header(config):
    return "tiers: behaviour tests first, then @pytest.mark.slow (deselect with -m 'not slow')"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny model folder (as `ldm init-model --config tiny --seed 0` writes it)."""
    from ldm_pipeline.models import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A random tiny SDXL-architecture model folder (`ldm init-model --config tiny_sdxl --seed 0`)."""
    from ldm_pipeline.models import init_model

    return init_model("tiny_sdxl", tmp_path_factory.mktemp("models") / "tiny_sdxl", seed=0)


@pytest.fixture(scope="session")
def generator(tiny_model):
    """The tiny model loaded once for in-process generation tests."""
    from ldm_pipeline.generator import ImageGenerator
    from ldm_pipeline.settings import RuntimeOptions

    return ImageGenerator.load(str(tiny_model), RuntimeOptions(device="cpu"))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run the real `ldm` console script in a subprocess."""
    import shutil
    import subprocess

    exe = shutil.which("ldm")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "ldm_pipeline", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_torchrun(*args: str, cwd: Path | None = None, timeout: int = 300, hooks: dict | None = None):
    """`ldm ARGS` on 2 CPU ranks (torchrun + gloo), with the training hooks of `hooks` (tests/training/hooks.py)
    installed in every rank when given. A hang (a collective some rank skips) is killed with its whole process
    group, so no orphaned rank keeps a core busy for the rest of the test session."""
    import json
    import signal
    import subprocess

    entry = "tests.training.hooks" if hooks is not None else "ldm_pipeline"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", entry, *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if hooks is not None:
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), LDM_TEST_HOOKS=json.dumps(hooks))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ldm {' '.join(args[:3])} ... hung for {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
