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
* SDXL: ``input_ids_2`` (the second tokenizer's), ``prompt_embeds`` = both encoders' penultimate hidden states
  concatenated, and ``pooled_prompt_embeds`` (the empty prompt's too); for every model ``original_sizes`` and
  ``crop_top_lefts`` (and ``crop_top_lefts_flip``, the mirrored crop's corner), which SDXL's size conditioning
  (``add_time_ids``) reads.

The precompute pass runs on every rank over that rank's share of the data (`build_dataset(rank, world_size)`, the
same split as training), with no collective operation inside it, so a slow rank cannot trip a NCCL timeout midway;
the loop waits at one barrier after it. A cache is reused when its fingerprint (data, the encoders' weights — the VAE,
the tokenizer(s), and the text encoder(s) when embeddings are cached —, what is cached, rank layout) matches, so a run
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
# the caption's entries, which caption dropout replaces by the empty prompt's (those present in empty.safetensors)
TEXT_KEYS = ("input_ids", "input_ids_2", "prompt_embeds", "pooled_prompt_embeds")
MANIFEST = "manifest.json"


def _cache_data_config(data: DataConfig) -> DataConfig:
    """The data settings of the precompute pass: deterministic transforms, every caption kept."""
    return dataclasses.replace(data, random_flip=False, caption_dropout=0.0, center_crop=True, shuffle=False)


def encoders_hash(vae, text_encoder, tokenizer, cache_embeddings: bool, text_encoder_2=None,
                  tokenizer_2=None) -> str:
    """Content hash of what the cache depends on: the VAE's weights, the tokenizers' vocabularies (and padding) and,
    when prompt embeddings are cached, the text encoders' weights (the UNet's weights do not change a cached
    encoding). SDXL's second text encoder and tokenizer count too; an SD model's hash is as it always was."""
    h = hashlib.sha256()
    modules = [("vae", vae)]
    if cache_embeddings:
        modules += [("text_encoder", text_encoder)] + ([("text_encoder_2", text_encoder_2)] if text_encoder_2 else [])
    for name, module in modules:
        for key, t in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for tok in [tokenizer] + ([tokenizer_2] if tokenizer_2 is not None else []):
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        h.update(str(getattr(tok, "model_max_length", "")).encode())
        if tok is tokenizer_2:  # it shares the first one's vocabulary and differs in its padding
            h.update(f"pad:{tok.pad_token}".encode())
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


def encode_prompts(text_encoders: list, ids: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """What the cache stores of a batch's captions: SD's ``prompt_embeds`` (the text encoder's last hidden states),
    or SDXL's ``prompt_embeds`` (both encoders' penultimate ones, concatenated) and ``pooled_prompt_embeds``, as
    training computes them uncached (`step.encode_text`, `xl.encode_text`), in float32 on the CPU."""
    from ldm_pipeline.prompts import encode_xl_tokens

    if len(text_encoders) == 1:
        return {"prompt_embeds": text_encoders[0](ids[0].to(device), return_dict=False)[0].float().cpu()}
    hidden, pooled = encode_xl_tokens(text_encoders, [i.to(device) for i in ids])
    return {"prompt_embeds": hidden.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}


def _size_entries(batch: dict[str, Any], keep: list[int], flip: bool) -> dict[str, torch.Tensor]:
    """SDXL's size conditioning of the kept samples: original sizes and crop corners, plus the corners of the
    mirrored images (the crop's left edge measured from the other side of the resized image) when flips are cached."""
    from ldm_pipeline.data.images import resized_size

    sizes, crops = batch["original_sizes"][keep], batch["crop_top_lefts"][keep]
    out = {"original_sizes": sizes, "crop_top_lefts": crops}
    if flip:
        th, tw = batch["pixel_values"].shape[-2:]
        mirrored = crops.clone()
        for i, ((h, w), (_, left)) in enumerate(zip(sizes.tolist(), crops.tolist())):
            mirrored[i, 1] = resized_size(w, h, (tw, th))[0] - left - tw
        out["crop_top_lefts_flip"] = mirrored
    return out


def _empty_prompt(text_encoders: list, tokenizers: list, device, cache_embeddings: bool) -> dict[str, torch.Tensor]:
    """The empty caption's token ids (and encodings), which caption dropout substitutes at training time."""
    ids = [tok([""], padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids.long() for tok in tokenizers]
    empty = {"input_ids": ids[0]} | ({"input_ids_2": ids[1]} if len(ids) > 1 else {})
    if cache_embeddings:
        empty.update(encode_prompts(text_encoders, ids, device))
    return empty


@torch.no_grad()
def build_cache(cache_dir: Path, data: DataConfig, batch_size: int, vae, text_encoder, tokenizer, device, dtype,
                model_hash: str, cache_embeddings: bool, rank: int, world_size: int, progress: bool = False,
                text_encoder_2=None, tokenizer_2=None) -> dict[str, Any]:  # ~90 lines: one pass, top to bottom
    """Encode this rank's share of one epoch into ``cache_dir/rankRofW`` (no-op when a matching cache exists), the
    VAE in `dtype`. SDXL (`text_encoder_2`) adds the second tokenizer's ids and the pooled embedding.
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

    text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    tokenizers = [tokenizer] + ([tokenizer_2] if text_encoder_2 is not None else [])
    cfg = _cache_data_config(data)
    dataset = build_dataset(cfg, batch_size, tokenizer=tokenizer, rank=rank, world_size=world_size,
                            tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None)
    loader = make_dataloader(dataset, cfg.num_workers)
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
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
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
        entries = dict(zip(("latent_mean", "latent_std"), posterior(pixels)))
        if data.random_flip:  # mirror of a centre crop = centre crop of the mirror
            entries.update(zip(("latent_mean_flip", "latent_std_flip"), posterior(pixels.flip(-1))))
        ids = [batch[k][keep] for k in ("input_ids", "input_ids_2")[: len(tokenizers)]]
        entries.update(zip(("input_ids", "input_ids_2"), ids))
        if cache_embeddings:
            entries.update(encode_prompts(text_encoders, ids, device))
        entries.update(_size_entries(batch, keep, data.random_flip))
        for k, v in entries.items():
            buffers.setdefault(k, []).append(v)
        scaling_keys.extend(batch["keys"][i] for i in keep)
        bar.update(len(keep))
        if sum(len(t) for t in buffers["input_ids"]) >= SHARD_SIZE:
            flush()
    flush()
    bar.close()
    if not scaling_keys:
        raise UserError(f"rank {rank}: no usable training sample to cache in {data.source}")
    save_file(_empty_prompt(text_encoders, tokenizers, device, cache_embeddings), str(out / "empty.safetensors"))
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
    prompt_embeds (when cached; caption dropout applied), for SDXL input_ids_2, pooled_prompt_embeds (when cached),
    original_sizes and crop_top_lefts (of the mirrored crop when mirrored), keys, state.
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
        self.fields = set(self.files[0].keys()) if self.files else set()
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
        for k in TEXT_KEYS:  # a dropped caption is the empty one for every text encoder
            if k in self.empty:
                row[k] = self.empty[k][0] if dropped else f.get_slice(k)[r]
        if "original_sizes" in self.fields:  # SDXL's size conditioning (caches written before it lack it)
            row["original_sizes"] = f.get_slice("original_sizes")[r]
            row["crop_top_lefts"] = f.get_slice(f"crop_top_lefts{suffix}")[r]
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
