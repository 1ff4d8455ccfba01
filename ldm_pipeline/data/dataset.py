"""The training stream: shards split across ranks and workers, shuffled per epoch, batched by bucket, resumable.

Each DataLoader worker is a *logical worker* ``g = rank * num_workers + worker`` of ``G = world_size * num_workers``.
With at least G shards, worker g reads shards ``order[g::G]`` of the epoch's shard order; with fewer, every worker
reads every shard and keeps sample j of the p-th shard when ``(j + p) % G == g`` (local tars and parquet skip the
others unread). Either way no sample is seen twice in an epoch and none is dropped: leftover partial batches are
emitted at the end of each worker's epoch. The stream is infinite; epoch e+1 reshuffles.

Resume: every batch carries ``state``, the position of its logical worker *after* the batch: (epoch, shard position,
sample position) in its deterministic stream, counting skipped samples too, plus refs to the samples waiting in
other buckets. Crops, flips and caption dropout draw from an RNG seeded by (seed, epoch, sample key), so re-reading
a sample reproduces it. The DataLoader hands out batches round-robin from workers 0..W-1, so `LoaderState` also
records which logical worker is next; on resume real worker 0 takes over that one and the stream continues exactly,
without reading (local files) or decoding (any source) the samples before the position.
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm_pipeline.data import images
from ldm_pipeline.data.buckets import assign_bucket, make_buckets
from ldm_pipeline.data.captions import process_caption, tokenize_captions
from ldm_pipeline.data.config import DataConfig
from ldm_pipeline.data.filters import filter_reason
from ldm_pipeline.data.sources import RawSample, Shard, open_sources
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError

log = logging.getLogger("ldm_pipeline.data")

# a worker that gets no usable sample in this many epochs in a row would block the DataLoader's round-robin forever
MAX_EMPTY_EPOCHS = 3


@dataclass
class LoaderState:
    """What the training loop saves to resume the data stream: each logical worker's last state, and who is next.

    Update it with ``batch["state"]`` after every batch; `to_dict` is JSON-ready. One per rank: each rank's workers
    have their own positions (save ``data_state_rank{rank}``, or gather them).
    """

    next_worker: int = 0
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def update(self, state: dict[str, Any]) -> None:
        """Record the state a batch carried (``batch["state"]``, or the batch itself)."""
        state = state.get("state", state)
        worker = int(state["worker"])
        self.workers[worker] = state
        self.next_worker = (worker + 1) % int(state["num_workers"])

    @property
    def num_workers(self) -> int | None:
        """Worker count the states were made with (None before the first batch)."""
        return next((int(s["num_workers"]) for s in self.workers.values()), None)

    def stats(self) -> DataStats:
        """This rank's DataStats so far, merged over its workers (merge ranks' results for the whole run)."""
        out = DataStats()
        for s in self.workers.values():
            out = out.merge(DataStats.from_dict(s["stats"])).merge(DataStats.from_dict(s["epoch_stats"]))
        return out

    def finished_epochs_stats(self) -> DataStats:
        """Like `stats`, without the epochs the workers are still in (a per-epoch summary)."""
        out = DataStats()
        for s in self.workers.values():
            out = out.merge(DataStats.from_dict(s["stats"]))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (worker ids become string keys)."""
        return {"next_worker": self.next_worker, "workers": {str(k): v for k, v in sorted(self.workers.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderState:
        """Inverse of `to_dict`."""
        return cls(int(data.get("next_worker", 0)), {int(k): v for k, v in data.get("workers", {}).items()})


@dataclass
class _Item:
    """A prepared sample waiting in its bucket."""

    key: str
    ref: list[Any]
    bucket: tuple[int, int]
    pixels: torch.Tensor  # uint8 [3, H, W]: a quarter of float32 while pending
    caption: str
    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    crop_top_left: tuple[int, int]


def _hashable(item: Any) -> Any:
    return tuple(item) if isinstance(item, list) else item


class ShardedCaptionDataset(IterableDataset):
    """Yields whole batches: pixel_values, captions, input_ids (with a tokenizer), input_ids_2 (with SDXL's second
    tokenizer, which pads otherwise), original_sizes, crop_top_lefts, keys, state. Use with ``make_dataloader``
    (DataLoader with ``batch_size=None``)."""

    def __init__(self, shards: list[Shard], config: DataConfig, batch_size: int, tokenizer=None, rank: int = 0,
                 world_size: int = 1, max_chunks: int = 1, tokenizer_2=None):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if config.resolution % 8 or config.resolution < 8:
            raise UserError(
                f"data.resolution must be a multiple of 8 (VAE latents are 1/8 size), got {config.resolution}"
            )
        if config.bucketing and config.bucket_step % 8:
            raise UserError(f"data.bucket_step must be a multiple of 8, got {config.bucket_step}")
        self.shards, self.config, self.batch_size = shards, config, batch_size
        self.tokenizer, self.rank, self.world_size, self.max_chunks = tokenizer, rank, world_size, max_chunks
        self.tokenizer_2 = tokenizer_2
        res = config.resolution
        self.buckets = (make_buckets(res, config.bucket_step, config.min_bucket_side, config.max_bucket_side)
                        if config.bucketing else [(res, res)])
        self.resume: LoaderState | None = None

    def load_state_dict(self, state: LoaderState | dict[str, Any]) -> None:
        """Continue from a saved `LoaderState` (or its dict) on the next iteration."""
        state = state if isinstance(state, LoaderState) else LoaderState.from_dict(state)
        for s in state.workers.values():
            if (s["rank"], s["world_size"]) != (self.rank, self.world_size):
                raise UserError(f"data state is for rank {s['rank']} of {s['world_size']}, "
                                f"this is rank {self.rank} of {self.world_size}: resume with the same processes")
            if s["num_shards"] != len(self.shards):
                raise UserError(f"data state is for {s['num_shards']} shards, the source now has "
                                f"{len(self.shards)}: resume with the same data")
        self.resume = state

    def __iter__(self):
        info = get_worker_info()
        real, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self.resume
        if resume is not None and resume.num_workers not in (None, workers):
            raise UserError(f"data state was saved with {resume.num_workers} workers, now {workers}: "
                            "resume with the same data.num_workers")
        rotation = resume.next_worker if resume is not None else 0
        local = (real + rotation) % workers  # real worker 0 serves the batch that was next
        saved = resume.workers.get(local) if resume is not None else None
        return self._batches(local, workers, saved)

    # -- one logical worker's stream ---------------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.config.shuffle:
            random.Random(f"shards:{self.config.seed}:{epoch}").shuffle(order)
        return order

    def _batches(self, local: int, workers: int, saved: dict[str, Any] | None):
        g, total = self.rank * workers + local, self.world_size * workers
        epoch, p0, j0 = (saved["epoch"], saved["shard_pos"], saved["sample_pos"]) if saved else (0, 0, 0)
        stats = DataStats.from_dict(saved["stats"]) if saved else DataStats()  # before this epoch
        epoch_stats = DataStats.from_dict(saved["epoch_stats"]) if saved else DataStats()
        pending = self._restore(saved["pending"], epoch) if saved else {}
        empty_epochs = 0

        def state(p: int, j: int) -> dict[str, Any]:
            return {"worker": local, "num_workers": workers, "rank": self.rank, "world_size": self.world_size,
                    "num_shards": len(self.shards), "epoch": epoch, "shard_pos": p, "sample_pos": j,
                    "pending": [[list(b), [i.ref for i in items]] for b, items in pending.items()],
                    "stats": stats.to_dict(), "epoch_stats": epoch_stats.to_dict()}

        while True:
            order = self._shard_order(epoch)
            by_shard = len(self.shards) >= total
            mine = order[g::total] if by_shard else order
            emitted = 0
            for p in range(p0, len(mine)):
                shard = self.shards[mine[p]]
                want = None if by_shard else (lambda j, p=p: (j + p) % total == g)
                seed = f"{self.config.seed}:{epoch}:{shard.shard_id}" if self.config.shuffle else None
                for j, raw in self._guarded(shard.iterate(seed, j0 if p == p0 else 0, want, epoch_stats), shard,
                                            epoch_stats):
                    item = self._prepare(raw, epoch, epoch_stats)
                    if item is None:
                        continue
                    items = pending.setdefault(item.bucket, [])
                    items.append(item)
                    if len(items) == self.batch_size:
                        del pending[item.bucket]
                        batch = self._collate(items, epoch_stats)
                        batch["state"] = state(p, j + 1)
                        emitted += 1
                        yield batch
            while pending:  # epoch end: partial batches too, nothing silently dropped
                items = pending.pop(next(iter(pending)))
                batch = self._collate(items, epoch_stats)
                batch["state"] = state(len(mine), 0)
                emitted += 1
                yield batch
            log.info("epoch %d rank %d worker %d/%d: %s", epoch, self.rank, local, workers, epoch_stats.summary())
            empty_epochs = empty_epochs + 1 if emitted == 0 and epoch_stats.used == 0 else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise UserError(f"rank {self.rank} worker {local} got no usable sample in {MAX_EMPTY_EPOCHS} epochs "
                                f"({epoch_stats.summary()}): too little data for {total} workers, or filters too "
                                "strict")
            stats, epoch_stats = stats.merge(epoch_stats), DataStats()
            epoch, p0, j0 = epoch + 1, 0, 0

    @staticmethod
    def _guarded(samples, shard: Shard, stats: DataStats):
        """A shard's samples until it fails to read (deleted file, network error, corrupt parquet): then the rest of
        that shard is skipped and counted, like webdataset's warn_and_continue, instead of ending a long run."""
        while True:
            try:
                yield next(samples)
            except StopIteration:
                return
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:
                stats.note("unreadable_shard")
                log.warning("skipping the rest of shard %s: %s", shard.name, str(e).splitlines()[0] if str(e) else e)
                return

    def _restore(self, pending: list[Any], epoch: int) -> dict[tuple[int, int], list[_Item]]:
        """Re-read and re-prepare the samples that were waiting in buckets (deterministic, so identical)."""
        wanted: dict[int, list[Any]] = {}
        for _, refs in pending:
            for shard_id, item in refs:
                wanted.setdefault(shard_id, []).append(_hashable(item))
        fetched: dict[int, dict[Any, RawSample]] = {}
        for sid, items in wanted.items():
            try:
                fetched[sid] = self.shards[sid].fetch(items)
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:  # the shard went away since the save
                log.warning("cannot re-read %d pending samples of shard %s: %s", len(items), self.shards[sid].name, e)
                fetched[sid] = {}
        out: dict[tuple[int, int], list[_Item]] = {}
        scratch = DataStats()  # these were counted before the checkpoint
        for bucket, refs in pending:
            for shard_id, item in refs:
                raw = fetched[shard_id].get(_hashable(item))
                prepared = self._prepare(raw, epoch, scratch) if raw is not None else None
                if prepared is not None:
                    out.setdefault(tuple(bucket), []).append(prepared)
        return out

    def _prepare(self, raw: RawSample, epoch: int, stats: DataStats) -> _Item | None:
        """Filter, decode, crop and caption one raw sample; None (and a counted reason) when it is skipped."""
        cfg = self.config
        stats.seen += 1
        caption = raw.caption.strip() if raw.caption else ""
        reason = raw.skip  # e.g. bad_metadata: the row itself did not parse
        if reason is None and not caption and not cfg.allow_empty_captions:
            reason = "no_caption"
        reason = reason or filter_reason(raw.meta, cfg.filters)
        if reason is None and raw.image is None:
            reason = "no_image"
        if reason is None:
            try:
                img = images.decode_image(raw.image, cfg.max_image_pixels, stats)
            except images.SkipSample as e:
                reason = e.reason
        if reason is None and cfg.min_size and min(img.size) < cfg.min_size:
            reason = "too_small"
        if reason is not None:
            stats.skip(reason)
            return None
        original_size = (img.height, img.width)
        bucket = assign_bucket(img.width, img.height, self.buckets) if cfg.bucketing else self.buckets[0]
        rng = random.Random(f"{cfg.seed}:{epoch}:{raw.key}")  # per sample, so a resumed run draws the same
        img, crop, upscaled = images.resize_and_crop(img, bucket, cfg.center_crop, cfg.random_flip, rng)
        if upscaled:
            stats.note("upscaled")
        caption = process_caption(caption, rng, cfg.caption_dropout, cfg.shuffle_tags, cfg.keep_tags)
        stats.used += 1
        return _Item(raw.key, raw.ref, bucket, images.to_uint8_chw(img), caption, original_size, crop)

    def _collate(self, items: list[_Item], stats: DataStats) -> dict[str, Any]:
        captions = [i.caption for i in items]
        batch: dict[str, Any] = {
            "pixel_values": images.normalize(torch.stack([i.pixels for i in items])),
            "captions": captions,
            "original_sizes": torch.tensor([i.original_size for i in items], dtype=torch.long),
            "crop_top_lefts": torch.tensor([i.crop_top_left for i in items], dtype=torch.long),
            "keys": [i.key for i in items],
        }
        if self.tokenizer is not None:
            batch["input_ids"] = tokenize_captions(self.tokenizer, captions, self.max_chunks, stats)
        if self.tokenizer_2 is not None:  # the same captions (a dropped one is "" for both), counted once
            batch["input_ids_2"] = tokenize_captions(self.tokenizer_2, captions, self.max_chunks)
        return batch


def build_dataset(config: DataConfig, batch_size: int, tokenizer=None, rank: int = 0, world_size: int = 1,
                  max_chunks: int = 1, tokenizer_2=None) -> ShardedCaptionDataset:
    """The batch stream for one rank: lists the source's shards (opening none) and sets up splitting/bucketing.
    `tokenizer_2` (SDXL's second tokenizer) adds ``input_ids_2``."""
    shards = open_sources(config.source, config.format, config.image_column, config.caption_column,
                          min_shards=world_size * max(1, config.num_workers), shuffle_buffer=config.shuffle_buffer,
                          hf_split=config.hf_split)
    return ShardedCaptionDataset(shards, config, batch_size, tokenizer, rank, world_size, max_chunks, tokenizer_2)


def make_dataloader(dataset: ShardedCaptionDataset, num_workers: int,
                    state: LoaderState | dict[str, Any] | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the batch stream (``batch_size=None``: the dataset batches), resumed from `state`.

    The same `num_workers` (and ranks) as when the state was saved are required: they decide the split.
    """
    if state is not None:
        state = state if isinstance(state, LoaderState) else LoaderState.from_dict(state)
        if state.num_workers not in (None, max(1, num_workers)):
            raise UserError(f"data state was saved with {state.num_workers} workers, now {max(1, num_workers)}: "
                            "resume with the same data.num_workers")
        dataset.load_state_dict(state)
    if num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0 (got {num_workers})")
    if num_workers > 0:  # forked workers would otherwise warn that tokenizers parallelism gets disabled
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


_WORKER_USER_ERROR = "ldm_pipeline.errors.UserError: "


def worker_error_message(text: str) -> str:
    """The user's one-line message inside torch's re-raised worker error ("Caught UserError in DataLoader worker
    process 0. Original Traceback ... ldm_pipeline.errors.UserError: MESSAGE"); other text unchanged."""
    if not text.startswith("Caught UserError") or _WORKER_USER_ERROR not in text:
        return text
    return text.rsplit(_WORKER_USER_ERROR, 1)[1].strip()


class _Loader(DataLoader):
    """A DataLoader whose workers' UserErrors reach the caller as one-line UserErrors, as they would with
    ``num_workers=0`` (torch re-raises them with the worker's whole traceback in the message)."""

    def __iter__(self):
        return _one_line_worker_errors(super().__iter__())


def _one_line_worker_errors(batches):
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as e:
            raise UserError(worker_error_message(str(e))) from None
        yield batch
