"""Fixtures for the data tests: small img2dataset-style datasets on disk and a tiny CLIP tokenizer."""

from __future__ import annotations

import os

import pytest

from ldm_pipeline.data import DataConfig
from tests.fixtures import write_laion_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def laion_dir(tmp_path_factory):
    """Four clean webdataset shards of 24 samples in two image sizes."""
    out = tmp_path_factory.mktemp("laion")
    write_laion_fixture(out, n=24, shards=4, sizes=((64, 48), (48, 80)))
    return out


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A CLIP tokenizer with a 16-token window, trained on fixture-like captions."""
    from ldm_pipeline.tokenizer import build_clip_tokenizer

    texts = [f"sample {i}, tag{i % 3}, color{i % 5}, shape{i % 7}" for i in range(50)]
    return build_clip_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=600, model_max_length=16)


@pytest.fixture
def small_config():
    """Fast settings: 32 px squares, in-process iteration."""

    def make(source, **kw) -> DataConfig:
        kw.setdefault("resolution", 32)
        kw.setdefault("num_workers", 0)
        return DataConfig(source=str(source), **kw)

    return make


def _take_epoch(batches, workers: int = 1) -> list[dict]:
    out, done = [], set()
    for batch in batches:
        state = batch["state"]
        if state["epoch"] == 0:
            out.append(batch)
        else:
            done.add(state["worker"])
            if len(done) == workers:
                return out
    return out


@pytest.fixture
def take_epoch():
    """take_epoch(batches, workers=1): batches of epoch 0 from an infinite stream (stops once every worker is in
    epoch 1)."""
    return _take_epoch
