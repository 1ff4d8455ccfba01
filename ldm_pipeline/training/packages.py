"""The optional packages (the ``[train]`` extra) a training run needs, checked before it loads a model or creates
its output folder: a missing one is a one-line error naming the ``pip install``, not a traceback after minutes of
loading (or an empty output folder)."""

from __future__ import annotations

from pathlib import Path

from ldm_pipeline.extras import missing


def data_packages(source: str, format: str = "auto") -> dict[str, str]:
    """Module → what needs it, for reading `source` in `format` (see ldm_pipeline.data.sources)."""
    from ldm_pipeline.data.sources import detect_format, is_url

    if format == "hf":
        return {}  # the datasets package; the data layer names it itself (it is not in the [train] extra)
    need = {"braceexpand": "expanding the data source"}  # shard ranges and globs: every format but hf
    if format == "auto" and Path(source).is_dir():
        format = detect_format(source, [source])  # a folder says what it holds (a glob or URL tells less)
    if format in ("auto", "webdataset"):
        need["webdataset"] = "reading webdataset tars"
    if format in ("auto", "parquet"):
        need["pyarrow"] = "reading parquet files"
    if is_url(source) and not source.startswith("pipe:"):
        need["fsspec"] = "reading a URL data source"
    return need


def train_packages(config) -> dict[str, str]:
    """Module → what needs it, for a resolved `TrainConfig` (`ldm train`)."""
    need = {}
    if config.lora.rank > 0:
        need["peft"] = "LoRA training (lora.rank > 0)"
    # accelerate's tensorboard tracker takes tensorboardX when tensorboard is missing; "all" takes what is there
    if config.report_to == "tensorboard" and missing(("tensorboardX",)):
        need["tensorboard"] = "report_to tensorboard (or pass --report-to none)"
    need.update(data_packages(config.data.source, config.data.format))
    return need
