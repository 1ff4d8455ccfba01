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


@pytest.fixture(scope="session")
def tiny_xl_model(tmp_path_factory) -> Path:
    """A random tiny SDXL-architecture model folder (`ldm init-model --config tiny_sdxl --seed 0`)."""
    from ldm_pipeline.models import init_model

    return init_model("tiny_sdxl", tmp_path_factory.mktemp("models") / "tiny_sdxl", seed=0)


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
    """All tensors of a diffusers folder's unet and text encoder(s), keyed by component/name."""
    from safetensors.torch import load_file

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):  # text_encoder_2: SDXL only
        for f in sorted((folder / comp).glob("*.safetensors")):
            out.update({f"{comp}/{k}": v for k, v in load_file(f).items()})
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def lr_rates(config: TrainConfig, peak: float = 1e-4, steps: int | None = None) -> list[float]:
    """The rate each of the first `steps` (default: max_steps) optimizer steps of `config` runs at."""
    import torch

    from ldm_pipeline.training.setup import make_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = make_lr_scheduler(config, optimizer)
    rates = []
    for _ in range(config.max_steps if steps is None else steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates
