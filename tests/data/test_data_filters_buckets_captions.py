"""Metadata filters, aspect-ratio buckets, caption dropout / tag shuffle, tokenization."""

from __future__ import annotations

import math
import random

import pytest

from ldm_pipeline.config import from_dict
from ldm_pipeline.data import DataConfig, build_dataset, make_buckets, open_sources, tokenize_captions
from ldm_pipeline.data.buckets import assign_bucket
from ldm_pipeline.data.captions import process_caption, shuffle_caption_tags
from ldm_pipeline.data.config import FilterConfig
from ldm_pipeline.data.filters import filter_reason
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError


def test_filter_reason_missing_fields_pass():
    f = FilterConfig(min_original_width=100, max_punsafe=0.5, max_pwatermark=0.5, min_aesthetic=5,
                     min_similarity=0.3)
    assert filter_reason({}, f) is None
    assert filter_reason({"punsafe": None, "similarity": float("nan")}, f) is None
    assert filter_reason({"original_width": 50}, f) == "small_original"
    assert filter_reason({"punsafe": 0.9}, f) == "punsafe"
    assert filter_reason({"pwatermark": 0.6}, f) == "pwatermark"
    assert filter_reason({"AESTHETIC_SCORE": 4.5}, f) == "low_aesthetic"
    assert filter_reason({"aesthetic": 4.5}, f) == "low_aesthetic"
    assert filter_reason({"similarity": "0.1"}, f) == "low_similarity"
    assert filter_reason({"original_width": 100, "punsafe": 0.5, "aesthetic": 5, "similarity": 0.3}, f) is None


def test_filters_on_dataset_match_metadata(laion_dir, small_config, take_epoch):
    filters = FilterConfig(max_punsafe=0.45, min_aesthetic=4.5, min_original_height=60)
    metas = [r.meta for s in open_sources(str(laion_dir)) for _, r in s.iterate(None, 0, None, DataStats())]
    expected = {m["key"] for m in metas if filter_reason(m, filters) is None}
    assert 0 < len(expected) < len(metas)
    batches = take_epoch(iter(build_dataset(small_config(laion_dir, filters=filters), batch_size=4)))
    assert {k.split("/")[1] for b in batches for k in b["keys"]} == expected


def test_config_from_dict_nested_filters():
    cfg = from_dict(DataConfig, {"source": "x", "resolution": "256", "filters": {"max_punsafe": 0.2}})
    assert cfg.resolution == 256 and cfg.filters.max_punsafe == 0.2 and cfg.filters.min_aesthetic is None
    with pytest.raises(UserError, match="unknown config key 'filters.nope'"):
        from_dict(DataConfig, {"filters": {"nope": 1}})
    with pytest.raises(UserError):
        from_dict(DataConfig, {"format": "zip"})


def test_make_buckets_kohya_style():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert 0.8 * 512**2 <= w * h <= 512**2
    assert assign_bucket(1000, 500, buckets) == min(buckets, key=lambda b: abs(math.log(b[0] / b[1] / 2)))
    assert assign_bucket(300, 300, buckets) == (512, 512)


def test_bucketed_batches_share_a_size(tmp_path, small_config, take_epoch):
    from tests.fixtures import write_laion_fixture

    write_laion_fixture(tmp_path, n=30, shards=3, sizes=((96, 48), (48, 96), (64, 64), (80, 60)))
    config = small_config(tmp_path, resolution=128, bucketing=True, bucket_step=64, center_crop=False)
    batches = take_epoch(iter(build_dataset(config, batch_size=4)))
    assert sum(len(b["keys"]) for b in batches) == 30  # leftovers emitted at epoch end
    sizes = set()
    for b in batches:
        _, _, h, w = b["pixel_values"].shape
        sizes.add((w, h))
        assert w % 64 == 0 and h % 64 == 0 and 0.75 * 128**2 <= w * h <= 128**2
        assert b["crop_top_lefts"].shape == b["original_sizes"].shape == (len(b["keys"]), 2)
    assert len(sizes) >= 2 and sum(len(b["keys"]) < 4 for b in batches) <= len(sizes)


def test_caption_dropout_rate():
    dropped = sum(process_caption("a cat", random.Random(i), dropout=0.3) == "" for i in range(4000))
    assert 0.27 < dropped / 4000 < 0.33
    assert all(process_caption("a cat", random.Random(i)) == "a cat" for i in range(50))


def test_tag_shuffle_keeps_leading_tags():
    caption = "trigger, style, a, b, c, d, e, f"
    outs = {shuffle_caption_tags(caption, random.Random(i), keep_tags=2) for i in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["trigger", "style"] and sorted(tags[2:]) == list("abcdef")


def test_tokenize_truncates_and_counts(tokenizer):
    stats = DataStats()
    long = ", ".join(f"tag{i}" for i in range(30))
    ids = tokenize_captions(tokenizer, ["sample 1", long], stats=stats)
    assert ids.shape == (2, 16) and ids.dtype.is_floating_point is False
    assert ids[1, -1] == tokenizer.eos_token_id and stats.events == {"caption_truncated": 1}
    chunked = tokenize_captions(tokenizer, ["sample 1", long], max_chunks=2)
    assert chunked.shape == (2, 32) and (chunked[:, [0, 16]] == tokenizer.bos_token_id).all()


def test_batches_carry_input_ids(laion_dir, small_config, tokenizer):
    batch = next(iter(build_dataset(small_config(laion_dir), batch_size=3, tokenizer=tokenizer)))
    assert batch["input_ids"].shape == (3, 16)
    assert set(batch) == {"pixel_values", "captions", "input_ids", "original_sizes", "crop_top_lefts", "keys",
                          "state"}
