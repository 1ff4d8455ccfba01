"""Without the [train] extra, `ldm train` and `ldm train-vae` stop before loading anything or creating the output
folder, with one line naming the missing package and the pip install (a module is made missing in-process by
putting None in sys.modules, which makes both import and find_spec fail)."""

from __future__ import annotations

import sys

import pytest

from ldm_pipeline.training.packages import data_packages, train_packages


def _hide(monkeypatch, *modules: str) -> None:
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _no_model_loading(monkeypatch) -> None:
    import ldm_pipeline.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(ldm_pipeline.models, "load_pipeline", refuse)


def test_train_without_braceexpand_is_one_line_exit_2(tiny_model, laion_data, tmp_path, capsys, monkeypatch):
    from ldm_pipeline.cli.train import main

    _hide(monkeypatch, "braceexpand")
    _no_model_loading(monkeypatch)
    out = tmp_path / "out"
    rc = main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "--output-dir",
               str(out), "max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["ldm train: error: training needs a package that is not installed: braceexpand (for expanding the "
                   "data source); run pip install 'ldm_pipeline[train]'"]
    assert not out.exists()


def test_train_names_every_missing_package_at_once(tiny_model, laion_data, tmp_path, capsys, monkeypatch):
    from ldm_pipeline.cli.train import main

    _hide(monkeypatch, "peft", "webdataset", "tensorboard", "tensorboardX")
    _no_model_loading(monkeypatch)
    out = tmp_path / "out"
    rc = main(["--config", "tiny_test", "--model", str(tiny_model), "--data", str(laion_data), "--output-dir",
               str(out), "--lora-rank", "4", "--report-to", "tensorboard"])
    [err] = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert "peft (for LoRA" in err and "webdataset (for reading webdataset tars)" in err and "tensorboard" in err
    assert err.endswith("run pip install 'ldm_pipeline[train]'") and err.count("pip install") == 1


def test_train_vae_without_the_extra_is_one_line_exit_2(laion_data, tmp_path, capsys, monkeypatch):
    from ldm_pipeline.cli.train_vae import main

    _hide(monkeypatch, "braceexpand", "webdataset")
    out = tmp_path / "vae"
    rc = main(["--model", "config:tiny", "--data", str(laion_data), "--output-dir", str(out), "--max-steps", "1"])
    [err] = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err.startswith("ldm train-vae: error: VAE training needs packages that are not installed: braceexpand")
    assert "webdataset" in err and err.endswith("pip install 'ldm_pipeline[train]'")


def test_what_each_run_needs(tmp_path):
    from ldm_pipeline.training.config import load_train_config

    def needs(**layer) -> set[str]:
        base = {"model": "m", "output_dir": str(tmp_path), "data": {"source": "shards/{0..9}.tar"}}
        return set(train_packages(load_train_config(None, base, layer)))

    assert needs(report_to="none") == {"braceexpand", "webdataset", "pyarrow"}  # tars or parquet: not known yet
    assert "peft" in needs(lora={"rank": 4}) and "peft" not in needs()
    assert "tensorboard" not in needs(report_to="none") and "tensorboard" not in needs(report_to="all")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    assert set(data_packages(str(folder))) == {"braceexpand"}  # an image folder needs no webdataset or pyarrow
    assert set(data_packages("x.parquet", "parquet")) == {"braceexpand", "pyarrow"}
    assert "fsspec" in data_packages("s3://bucket/shards/{0..9}.tar")
    assert data_packages("user/dataset", "hf") == {}


@pytest.mark.parametrize("hidden", [(), ("tensorboard",)])
def test_tensorboardx_stands_in_for_tensorboard(hidden, monkeypatch, tmp_path):
    """accelerate's tensorboard tracker falls back to tensorboardX: either one is enough."""
    from ldm_pipeline.training.config import load_train_config

    _hide(monkeypatch, *hidden)
    monkeypatch.setitem(sys.modules, "tensorboardX", sys.modules["sys"])  # present (any module will do)
    cfg = load_train_config(None, {"model": "m", "output_dir": str(tmp_path), "data": {"source": "d"},
                                   "report_to": "tensorboard"})
    assert "tensorboard" not in train_packages(cfg)
