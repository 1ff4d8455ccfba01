"""Broken and odd images: each is fixed (used) or skipped with its reason, never a crash."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.data import build_dataset
from ldm_pipeline.data.images import SkipSample, decode_image, resize_and_crop
from ldm_pipeline.data.stats import DataStats
from tests.fixtures import FIXABLE_KINDS, ODD_KINDS, _payload, fixture_image, write_laion_fixture

SKIP_REASONS = {"corrupt": "corrupt_image", "truncated": "truncated_image", "not_image": "not_image",
                "no_caption": "no_caption", "empty_caption": "no_caption", "no_image": "no_image"}


def epoch_stats(batches) -> DataStats:
    last = batches[-1]["state"]
    return DataStats.from_dict(last["epoch_stats"])


@pytest.mark.parametrize("layout", ["webdataset", "parquet", "imagefolder"])
def test_every_odd_sample_fixed_or_skipped(tmp_path, small_config, take_epoch, layout):
    from tests import fixtures

    writer = {"webdataset": fixtures.write_laion_fixture, "parquet": fixtures.write_parquet_fixture,
              "imagefolder": fixtures.write_imagefolder_fixture}[layout]
    writer(tmp_path, n=4, odd=ODD_KINDS)
    config = small_config(tmp_path, max_image_pixels=1_000_000)
    batches = take_epoch(iter(build_dataset(config, batch_size=4)))
    stats = epoch_stats(batches)
    expected: dict[str, int] = {"decompression_bomb": 1}
    for kind, reason in SKIP_REASONS.items():
        if layout == "imagefolder" and kind == "no_image":
            reason = "missing_file"  # a file_name pointing nowhere
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.skipped == expected
    fixed = len(FIXABLE_KINDS) - 1  # the bomb is in FIXABLE_KINDS only under the default pixel limit
    assert stats.used == 4 + fixed == sum(len(b["keys"]) for b in batches)
    assert stats.seen == 4 + len(ODD_KINDS)
    for event in ("converted_CMYK", "converted_L", "converted_RGBA", "converted_P", "converted_I_16", "exif_rotated"):
        assert stats.events.get(event) == 1, event
    for b in batches:
        px = b["pixel_values"]
        assert px.dtype.is_floating_point and px.shape[1:] == (3, 32, 32)
        assert px.min() >= -1 and px.max() <= 1


def test_empty_captions_allowed_when_configured(tmp_path, small_config, take_epoch):
    write_laion_fixture(tmp_path, n=2, odd=("no_caption", "empty_caption"))
    batches = take_epoch(iter(build_dataset(small_config(tmp_path, allow_empty_captions=True), batch_size=8)))
    captions = [c for b in batches for c in b["captions"]]
    assert len(captions) == 4 and captions.count("") == 2


def test_min_size_skips_small_images(tmp_path, small_config, take_epoch):
    write_laion_fixture(tmp_path, n=3, odd=("tiny",))
    batches = take_epoch(iter(build_dataset(small_config(tmp_path, min_size=16), batch_size=8)))
    assert epoch_stats(batches).skipped == {"too_small": 1}


def test_truncated_tar_keeps_complete_samples(tmp_path, small_config):
    write_laion_fixture(tmp_path, n=20, shards=2, truncate_tar=True)
    stream = iter(build_dataset(small_config(tmp_path), batch_size=4))
    while (batch := next(stream))["state"]["epoch"] == 0:
        pass
    stats = DataStats.from_dict(batch["state"]["stats"])  # epoch 0 as a whole (noted when the shard ended)
    assert stats.events["truncated_shard"] == 1 and not stats.skipped
    assert 10 < stats.used < 20  # all of the intact shard, the complete part of the cut one


def test_exif_orientation_applied():
    _, data, _ = _payload("exif_rotated", 3, (64, 48), 0)
    assert Image.open(io.BytesIO(data)).size == (48, 64)  # stored sideways
    stats = DataStats()
    img = decode_image(data, 10**8, stats)
    assert img.size == (64, 48) and stats.events == {"exif_rotated": 1}
    truth = fixture_image(3)
    diff = np.abs(np.asarray(img, dtype=float) - np.asarray(truth, dtype=float)).mean()
    upside_down = np.abs(np.asarray(img, dtype=float) - np.asarray(truth.rotate(180), dtype=float)).mean()
    assert diff < 20 and diff < upside_down / 3  # upright again (JPEG noise only)


def test_rgba_composited_on_white_and_16bit_scaled():
    _, data, _ = _payload("rgba", 0, (64, 48), 0)
    img = decode_image(data, 10**8)
    assert img.mode == "RGB" and img.getpixel((0, 10)) == (255, 255, 255)  # alpha 0 at the left edge
    _, data, _ = _payload("16bit", 0, (64, 48), 0)
    arr = np.asarray(decode_image(data, 10**8))
    assert arr.shape == (48, 64, 3) and 50 < arr.mean() < 200


def test_decode_skip_reasons():
    for kind, reason in (("corrupt", "corrupt_image"), ("truncated", "truncated_image"), ("not_image", "not_image")):
        with pytest.raises(SkipSample) as e:
            decode_image(_payload(kind, 0, (64, 48), 0)[1], 10**8)
        assert e.value.reason == reason
    with pytest.raises(SkipSample, match="decompression_bomb"):
        decode_image(_payload("bomb", 0, (64, 48), 0)[1], 1000)


def test_resize_and_crop_records_crop_and_flip():
    import random

    img = fixture_image(0, (80, 40))
    out, (top, left), upscaled = resize_and_crop(img, (32, 32), True, False, random.Random(0))
    assert out.size == (32, 32) and (top, left) == (0, 16) and not upscaled
    _, (top, left), _ = resize_and_crop(img, (64, 64), False, False, random.Random(0))
    assert top == 0 and 0 <= left <= 64
    flips = [resize_and_crop(img, (32, 32), True, True, random.Random(s))[1] for s in range(20)]
    assert {f[1] for f in flips} == {16}  # center crop of a 64x32 image is symmetric under the flip
