"""Training data: captioned images (webdataset tars, parquet, image folders with metadata or kohya-style caption
files, HF datasets) as batches; docs/data_formats.md describes each layout.

Usage in a training loop (rank and world_size come from accelerate)::

    from ldm_pipeline.data import DataConfig, LoaderState, build_dataset, make_dataloader

    dataset = build_dataset(config.data, batch_size=16, tokenizer=tokenizer, rank=rank, world_size=world_size)
    state = LoaderState.from_dict(checkpoint["data"]) if resuming else LoaderState()
    for batch in make_dataloader(dataset, config.data.num_workers, state if resuming else None):
        ...  # batch["pixel_values"] [B,3,H,W] in [-1,1], batch["input_ids"], batch["captions"], ...
        state.update(batch["state"])       # after the step; save state.to_dict() (JSON) with each checkpoint

The stream is infinite (epochs follow each other, reshuffled); resuming from a saved `LoaderState` yields exactly
the batches the uninterrupted run would have, without re-reading the samples before. See `dataset` for how.

Public surface: `DataConfig`, `FilterConfig`, `build_dataset`, `make_dataloader`, `LoaderState`,
`ShardedCaptionDataset`, `DataStats`, `open_sources`, `tokenize_captions`, `make_buckets`.
Test fixtures that write img2dataset-style data: `tests/fixtures.py` (in the repository, not the package).
"""

from ldm_pipeline.data.config import DataConfig, FilterConfig

__all__ = [
    "DataConfig",
    "FilterConfig",
    "build_dataset",
    "make_dataloader",
    "LoaderState",
    "ShardedCaptionDataset",
    "DataStats",
    "open_sources",
    "tokenize_captions",
    "make_buckets",
]

# torch and friends load on first use, so the training config can import DataConfig cheaply
_LAZY = {
    "build_dataset": "dataset",
    "make_dataloader": "dataset",
    "LoaderState": "dataset",
    "ShardedCaptionDataset": "dataset",
    "DataStats": "stats",
    "open_sources": "sources",
    "tokenize_captions": "captions",
    "make_buckets": "buckets",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"ldm_pipeline.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ldm_pipeline.data' has no attribute {name!r}")
