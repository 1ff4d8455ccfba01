"""The batch stream: deterministic shuffling, rank/worker splitting, epochs, and exact resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ldm_pipeline.data import LoaderState, build_dataset, make_dataloader
from ldm_pipeline.data import images as images_module
from ldm_pipeline.data.sources import LocalTarShard
from ldm_pipeline.errors import UserError
from tests.fixtures import write_imagefolder_fixture, write_laion_fixture, write_parquet_fixture


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_order_deterministic_per_seed(laion_dir, small_config, take_epoch):
    def order(seed):
        return keys_of(take_epoch(iter(build_dataset(small_config(laion_dir, seed=seed), batch_size=4))))

    a = order(0)
    assert a == order(0) and sorted(a) == sorted(order(1)) and a != order(1)
    unshuffled = keys_of(take_epoch(iter(build_dataset(small_config(laion_dir, shuffle=False), batch_size=4))))
    assert unshuffled == sorted(unshuffled, key=lambda k: (k.split("/")[0], k))


def test_epochs_reshuffle_and_log(laion_dir, small_config, caplog):
    stream = iter(build_dataset(small_config(laion_dir), batch_size=4))
    with caplog.at_level(logging.INFO, logger="ldm_pipeline.data"):
        batches = [next(stream) for _ in range(13)]  # 6 per epoch
    epochs = [b["state"]["epoch"] for b in batches]
    assert epochs == [0] * 6 + [1] * 6 + [2]
    assert sorted(keys_of(batches[:6])) == sorted(keys_of(batches[6:12])) and keys_of(batches[:6]) != keys_of(
        batches[6:12])
    assert any("epoch 0 rank 0 worker 0/1: seen 24, used 24, skipped 0" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("shards", [8, 2])  # 8 ≥ 2 ranks × 2 workers: split by shard; 2: split by sample
def test_ranks_and_workers_disjoint_and_complete(tmp_path, small_config, take_epoch, shards):
    write_laion_fixture(tmp_path, n=30, shards=shards)
    seen: list[str] = []
    for rank in range(2):
        dataset = build_dataset(small_config(tmp_path, num_workers=2), batch_size=3, rank=rank, world_size=2)
        batches = take_epoch(make_dataloader(dataset, num_workers=2), workers=2)
        assert {b["state"]["worker"] for b in batches} == {0, 1}
        seen += keys_of(batches)
    assert len(seen) == len(set(seen)) == 30


# shards ≥ workers (split by shard), one shard (split by sample), streamed URL, parquet row groups, image folder
@pytest.mark.parametrize("layout", ["webdataset", "one_shard", "pipe", "parquet", "imagefolder"])
def test_exact_resume_two_workers(tmp_path, small_config, tokenizer, layout):
    sizes = ((64, 48), (48, 80), (56, 56), (96, 40))
    source = tmp_path
    if layout in ("webdataset", "one_shard", "pipe"):
        shards = 1 if layout == "one_shard" else 3
        write_laion_fixture(tmp_path, n=40, shards=shards, odd=("corrupt", "no_caption"), sizes=sizes)
        if layout == "pipe":
            source = f"pipe:cat {tmp_path}/{{00000..00002}}.tar"
    elif layout == "parquet":
        write_parquet_fixture(tmp_path, n=40, files=1, row_group_size=7, sizes=sizes)
    else:
        write_imagefolder_fixture(tmp_path, n=40, sizes=sizes)
    config = small_config(source, resolution=64, shuffle_buffer=5, bucketing=True, bucket_step=16, center_crop=False,
                          random_flip=True, caption_dropout=0.3, shuffle_tags=True, keep_tags=1, num_workers=2)

    def loader(state=None):
        return make_dataloader(build_dataset(config, batch_size=3, tokenizer=tokenizer), 2, state)

    k, m = 7, 16  # 40 samples in batches of 3 per bucket: m crosses the epoch boundary
    reference = []
    state = LoaderState()
    for i, batch in enumerate(loader()):
        if i < k:
            state.update(batch["state"])
        reference.append(batch)
        if len(reference) == k + m:
            break
    assert any(s["pending"] for s in state.workers.values())  # resume must restore half-filled buckets
    saved = json.loads(json.dumps(state.to_dict()))
    resumed = []
    for batch in loader(saved):
        resumed.append(batch)
        if len(resumed) == m:
            break
    for want, got in zip(reference[k:], resumed):
        assert got["keys"] == want["keys"] and got["captions"] == want["captions"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["crop_top_lefts"], want["crop_top_lefts"])
        assert got["state"] == want["state"]
    assert {b["state"]["epoch"] for b in resumed} == {0, 1}


def test_resume_reads_and_decodes_nothing_before_the_position(tmp_path, small_config, monkeypatch):
    write_laion_fixture(tmp_path, n=30, shards=2)
    config = small_config(tmp_path, num_workers=0)
    stream = iter(make_dataloader(build_dataset(config, batch_size=4), 0))
    state = LoaderState()
    before = []
    for _ in range(5):  # into the second shard
        batch = next(stream)
        state.update(batch["state"])
        before += batch["keys"]
    assert state.workers[0]["shard_pos"] == 1 and not state.workers[0]["pending"]
    expected = next(stream)["keys"]

    decoded, read = [], []
    real_decode, real_read = images_module.decode_image, LocalTarShard._read
    monkeypatch.setattr(images_module, "decode_image", lambda data, *a, **k: decoded.append(data) or
                        real_decode(data, *a, **k))
    monkeypatch.setattr(LocalTarShard, "_read", lambda self, f, key, members: read.append(key) or
                        real_read(self, f, key, members))
    batch = next(iter(make_dataloader(build_dataset(config, batch_size=4), 0, state.to_dict())))
    assert batch["keys"] == expected
    assert len(decoded) == 4 and len(read) == 4  # just this batch's samples
    assert not {f"{k[:5]}/{k}" for k in read} & set(before)


def test_resume_checks_worker_count_and_dataset(laion_dir, small_config, tmp_path):
    batch = next(iter(build_dataset(small_config(laion_dir), batch_size=4)))
    state = LoaderState()
    state.update(batch)
    assert state.stats().used >= 4 and state.num_workers == 1
    with pytest.raises(UserError, match="same data.num_workers"):
        make_dataloader(build_dataset(small_config(laion_dir), batch_size=4), 2, state)
    write_laion_fixture(tmp_path, n=4, shards=1)
    with pytest.raises(UserError, match="same data"):
        make_dataloader(build_dataset(small_config(tmp_path), batch_size=4), 0, state)
    with pytest.raises(UserError, match="rank"):
        make_dataloader(build_dataset(small_config(laion_dir), batch_size=4, rank=1, world_size=2), 0, state)


def test_too_little_data_for_workers_is_an_error(tmp_path, small_config):
    write_laion_fixture(tmp_path, n=1, shards=1)
    stream = iter(build_dataset(small_config(tmp_path), batch_size=2, rank=1, world_size=2))
    with pytest.raises(UserError, match="no usable sample"):
        next(stream)
