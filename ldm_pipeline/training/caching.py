"""Latent and text-embedding caching: encode every training image once, then train on the stored encodings.

What is stored (safetensors shards, one folder per rank, ``CACHE_DIR/rankRofW/``):

* ``latent_mean``, ``latent_std``: the VAE posterior N(mean, std²) of each image, *not* a sample of it. Training
  draws ``mean + std·ε`` with the run's checkpointed noise generator every time it sees the image, so the cached
  run optimises the same objective as the uncached one (which calls ``latent_dist.sample()`` every step).
* with ``data.random_flip``: the same for the horizontally mirrored image (``*_flip``). The flip is then chosen per
  (seed, epoch, sample key) at training time, so each epoch still sees a random half of the images mirrored.
  Crops are always centre crops (the config refuses ``cache_latents`` with random crops), so the mirrored crop is
  exactly the crop of the mirrored image.
* ``input_ids`` always, and ``prompt_embeds`` when the text encoder is frozen; plus the empty prompt's embedding
  (``empty.safetensors``), which caption dropout substitutes at training time (also per (seed, epoch, key)).

The precompute pass runs on every rank over that rank's share of the data (`build_dataset(rank, world_size)`, the
same split as training), with no collective operation inside it, so a slow rank cannot trip a NCCL timeout midway;
the loop waits at one barrier after it. A cache is reused when its fingerprint (data, the encoders' weights — the VAE,
the tokenizer, and the text encoder when embeddings are cached —, what is cached, rank layout) matches, so a run
continuing from a fine-tuned UNet reuses its parent's cache; ``manifest.json`` is written last and marks a complete rank cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from ldm_pipeline.data.config import DataConfig
from ldm_pipeline.errors import UserError

SHARD_SIZE = 256  # samples per safetensors file
MANIFEST = "manifest.json"


def _cache_data_config(data: DataConfig) -> DataConfig:
    """The data settings of the precompute pass: deterministic transforms, every caption kept."""
    return dataclasses.replace(data, random_flip=False, caption_dropout=0.0, center_crop=True, shuffle=False)


def encoders_hash(vae, text_encoder, tokenizer, cache_embeddings: bool) -> str:
    """Content hash of what the cache depends on: the VAE's weights, the tokenizer's vocabulary and, when prompt
    embeddings are cached, the text encoder's weights (the UNet's weights do not change a cached encoding)."""
    h = hashlib.sha256()
    modules = [("vae", vae)] + ([("text_encoder", text_encoder)] if cache_embeddings else [])
    for name, module in modules:
        for key, t in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "model_max_length", "")).encode())
    return h.hexdigest()


def fingerprint(data: DataConfig, model_hash: str, cache_embeddings: bool, rank: int, world_size: int) -> str:
    cfg = dataclasses.asdict(_cache_data_config(data))
    for k in ("num_workers", "seed", "shuffle_buffer"):
        cfg.pop(k, None)  # do not change what is encoded
    blob = json.dumps({"data": cfg, "model": model_hash, "embeds": cache_embeddings, "flip": data.random_flip,
                       "rank": rank, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rank_dir(cache_dir: Path, rank: int, world_size: int) -> Path:
    return cache_dir / f"rank{rank}of{world_size}"


@torch.no_grad()
def build_cache(cache_dir: Path, data: DataConfig, batch_size: int, vae, text_encoder, tokenizer, device, dtype,
                model_hash: str, cache_embeddings: bool, rank: int, world_size: int,
                progress: bool = False) -> dict[str, Any]:  # ~100 lines: one pass with its buffers, top to bottom
    """Encode this rank's share of one epoch into ``cache_dir/rankRofW`` (no-op when a matching cache exists).
    Returns the manifest. No collective ops: call ``accelerator.wait_for_everyone()`` after it."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ldm_pipeline.data import build_dataset, make_dataloader
    from ldm_pipeline.training.checkpoints import write_json

    out = rank_dir(cache_dir, rank, world_size)
    fp = fingerprint(data, model_hash, cache_embeddings, rank, world_size)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fp:
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    manifest_path.unlink(missing_ok=True)

    cfg = _cache_data_config(data)
    dataset = build_dataset(cfg, batch_size, tokenizer=tokenizer, rank=rank, world_size=world_size)
    loader = make_dataloader(dataset, cfg.num_workers)
    vae_dtype = dtype
    scaling_keys: list[str] = []
    buffers: dict[str, list[torch.Tensor]] = {}
    shards: list[str] = []
    seen_keys: set[str] = set()
    done_workers: set[int] = set()
    last_state: dict[str, dict] = {}

    def flush() -> None:
        if not buffers.get("input_ids"):
            return
        name = f"shard{len(shards):05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in buffers.items()}, str(out / name))
        shards.append(name)
        buffers.clear()

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(device, vae_dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    bar = tqdm(desc=f"caching latents (rank {rank})", unit="img", disable=not progress)
    # the stream is infinite: epoch 0 is over for a DataLoader worker once it hands out a batch of epoch 1
    for batch in loader:
        state = batch["state"]
        worker, workers = int(state["worker"]), int(state["num_workers"])
        if state["epoch"] >= 1:
            done_workers.add(worker)
            if len(done_workers) == workers:
                break
            continue
        last_state[str(worker)] = state
        keep = [i for i, k in enumerate(batch["keys"]) if k not in seen_keys]
        if not keep:
            continue
        pixels = batch["pixel_values"][keep]
        seen_keys.update(batch["keys"][i] for i in keep)
        mean, std = posterior(pixels)
        buffers.setdefault("latent_mean", []).append(mean)
        buffers.setdefault("latent_std", []).append(std)
        if data.random_flip:
            mean_f, std_f = posterior(pixels.flip(-1))  # mirror of a centre crop = centre crop of the mirror
            buffers.setdefault("latent_mean_flip", []).append(mean_f)
            buffers.setdefault("latent_std_flip", []).append(std_f)
        ids = batch["input_ids"][keep]
        buffers.setdefault("input_ids", []).append(ids)
        if cache_embeddings:
            emb = text_encoder(ids.to(device), return_dict=False)[0]
            buffers.setdefault("prompt_embeds", []).append(emb.float().cpu())
        scaling_keys.extend(batch["keys"][i] for i in keep)
        bar.update(len(keep))
        if sum(len(t) for t in buffers["input_ids"]) >= SHARD_SIZE:
            flush()
    flush()
    bar.close()
    if not scaling_keys:
        raise UserError(f"rank {rank}: no usable training sample to cache in {data.source}")
    empty_ids = tokenizer([""], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    empty = {"input_ids": empty_ids.long()}
    if cache_embeddings:
        empty["prompt_embeds"] = text_encoder(empty_ids.to(device), return_dict=False)[0].float().cpu()
    save_file(empty, str(out / "empty.safetensors"))
    from ldm_pipeline.data.stats import DataStats

    stats = DataStats()
    for s in last_state.values():
        stats = stats.merge(DataStats.from_dict(s["epoch_stats"]))
    manifest = {"fingerprint": fp, "count": len(scaling_keys), "keys": scaling_keys, "shards": shards,
                "shard_size": SHARD_SIZE, "flip": data.random_flip, "embeds": cache_embeddings,
                "stats": stats.to_dict()}
    write_json(manifest_path, manifest)  # last: marks the cache complete
    return manifest


class CachedLatentDataset:
    """Batches of cached encodings for one rank, reshuffled every epoch; `state` after each batch resumes exactly.

    Yields dicts with latent_mean, latent_std (already mirrored where the epoch's coin says so), input_ids,
    prompt_embeds (when cached; caption dropout applied), keys, state.
    """

    def __init__(self, cache_dir: Path, rank: int, world_size: int, batch_size: int, data: DataConfig):
        from safetensors import safe_open

        self.dir = rank_dir(cache_dir, rank, world_size)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        self.batch_size, self.data = batch_size, data
        self.files = [safe_open(str(self.dir / name), framework="pt") for name in self.manifest["shards"]]
        self.rows: list[tuple[int, int]] = []
        for f_idx, f in enumerate(self.files):
            n = f.get_slice("input_ids").get_shape()[0]
            self.rows.extend((f_idx, r) for r in range(n))
        with safe_open(str(self.dir / "empty.safetensors"), framework="pt") as f:
            self.empty = {k: f.get_tensor(k) for k in f.keys()}
        self.keys = self.manifest["keys"]
        self.epoch, self.index = 0, 0

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.data.shuffle:
            random.Random(f"cache:{self.data.seed}:{epoch}").shuffle(order)
        return order

    def _row(self, i: int, epoch: int) -> dict[str, torch.Tensor]:
        f_idx, r = self.rows[i]
        f = self.files[f_idx]
        key = self.keys[i]
        # per (seed, epoch, key) like the data layer, so resuming redraws the same choices
        rng = random.Random(f"{self.data.seed}:{epoch}:{key}:cached")
        flip = self.manifest["flip"] and rng.random() < 0.5
        suffix = "_flip" if flip else ""
        row = {"latent_mean": f.get_slice(f"latent_mean{suffix}")[r], "latent_std": f.get_slice(f"latent_std{suffix}")[r]}
        dropped = self.data.caption_dropout > 0 and rng.random() < self.data.caption_dropout
        row["input_ids"] = self.empty["input_ids"][0] if dropped else f.get_slice("input_ids")[r]
        if self.manifest["embeds"]:
            row["prompt_embeds"] = self.empty["prompt_embeds"][0] if dropped else f.get_slice("prompt_embeds")[r]
        return row

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.index < len(order):
                idx = order[self.index : self.index + self.batch_size]
                rows = [self._row(i, self.epoch) for i in idx]
                batch: dict[str, Any] = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
                batch["keys"] = [self.keys[i] for i in idx]
                self.index += len(idx)
                batch["state"] = {"epoch": self.epoch, "index": self.index}
                yield batch
            self.epoch, self.index = self.epoch + 1, 0
