"""Every layout and spec form reads back the samples that were written."""

from __future__ import annotations

import sys
import tarfile

import pytest

from ldm_pipeline.data import build_dataset, open_sources
from ldm_pipeline.data.sources import LocalTarShard, ParquetShard, StreamTarShard
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError
from tests.fixtures import write_imagefolder_fixture, write_laion_fixture, write_parquet_fixture


def all_keys(shards) -> list[str]:
    return [raw.key for s in shards for _, raw in s.iterate(None, 0, None, DataStats())]


def expected_laion_keys(n: int, shards: int) -> set[str]:
    return {f"{i % shards:05d}/{i % shards:05d}{i:04d}" for i in range(n)}


def test_webdataset_directory_glob_brace_and_file(laion_dir):
    expected = expected_laion_keys(24, 4)
    for spec in (laion_dir, f"{laion_dir}/*.tar", f"{laion_dir}/{{00000..00003}}.tar", f"file://{laion_dir}"):
        shards = open_sources(str(spec))
        assert len(shards) == 4 and all(isinstance(s, LocalTarShard) for s in shards)
        keys = all_keys(shards)
        assert len(keys) == len(set(keys)) and set(keys) == expected
    single = open_sources(f"{laion_dir}/00001.tar")
    assert set(all_keys(single)) == {k for k in expected if k.startswith("00001/")}


def test_webdataset_sample_has_caption_image_and_json(laion_dir):
    raw = next(open_sources(f"{laion_dir}/00000.tar")[0].iterate(None, 0, None, DataStats()))[1]
    assert raw.caption.startswith("sample 0,") and raw.image[:2] == b"\xff\xd8"
    assert raw.meta["key"] == "000000000" and "punsafe" in raw.meta and "AESTHETIC_SCORE" in raw.meta


def test_streamed_url_reads_like_local(laion_dir):
    shards = open_sources(f"pipe:cat {laion_dir}/{{00000..00003}}.tar")
    assert all(isinstance(s, StreamTarShard) for s in shards)
    assert set(all_keys(shards)) == expected_laion_keys(24, 4)
    # shuffle buffer: same multiset, deterministic for a seed
    s = shards[0]
    a = [r.key for _, r in s.iterate("x", 0, None, DataStats())]
    assert a == [r.key for _, r in s.iterate("x", 0, None, DataStats())]
    assert sorted(a) == sorted(r.key for _, r in s.iterate(None, 0, None, DataStats()))
    assert s.fetch([a[2].split("/")[1]])[a[2].split("/")[1]].key == a[2]


def test_parquet_files_and_row_groups(tmp_path, small_config, take_epoch):
    write_parquet_fixture(tmp_path / "one", n=10, files=1, row_group_size=3)
    shards = open_sources(str(tmp_path / "one"), min_shards=2)
    assert len(shards) == 4 and all(isinstance(s, ParquetShard) for s in shards)  # row groups of 3,3,3,1
    assert len(set(all_keys(shards))) == 10
    assert len(open_sources(str(tmp_path / "one" / "00000.parquet"))) == 1  # enough files: one shard per file
    write_parquet_fixture(tmp_path / "custom", n=6, image_column="img_bytes", caption_column="alt")
    with pytest.raises(UserError, match="image column"):
        open_sources(str(tmp_path / "custom"))
    cfg = small_config(tmp_path / "custom", image_column="img_bytes", caption_column="alt")
    batches = take_epoch(iter(build_dataset(cfg, batch_size=4)))
    assert sum(len(b["keys"]) for b in batches) == 6


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder(tmp_path, small_config, take_epoch, metadata):
    write_imagefolder_fixture(tmp_path, n=7, metadata=metadata)
    batches = take_epoch(iter(build_dataset(small_config(tmp_path), batch_size=3)))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == [f"images/{i:05d}.jpg" for i in range(7)]
    assert all(c.startswith("sample") for b in batches for c in b["captions"])


def test_hf_dataset_without_datasets_package_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="needs the datasets package") as e:
        open_sources("someone/some-dataset")
    assert "\n" not in str(e.value)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        open_sources(str(tmp_path / "nothing*.tar"))
    with pytest.raises(UserError, match="no training data"):
        open_sources("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.tar"):
        open_sources(str(tmp_path / "empty"))


def test_startup_opens_no_tar(tmp_path, monkeypatch, small_config):
    write_laion_fixture(tmp_path, n=40, shards=40)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    dataset = build_dataset(small_config(tmp_path), batch_size=2)
    assert opened == []
    next(iter(dataset))
    assert len(opened) == 2  # one sample per shard: the first batch reads exactly two shards


def test_fsspec_url_glob(laion_dir, small_config, take_epoch):
    import fsspec

    fs = fsspec.filesystem("memory")
    for tar in sorted(laion_dir.glob("*.tar")):
        fs.pipe(f"/laion/{tar.name}", tar.read_bytes())
    shards = open_sources("memory://laion/*.tar")
    assert len(shards) == 4 and all(isinstance(s, StreamTarShard) for s in shards)
    batches = take_epoch(iter(build_dataset(small_config("memory://laion/*.tar"), batch_size=5)))
    assert {k for b in batches for k in b["keys"]} == expected_laion_keys(24, 4)


def test_unreadable_shard_is_skipped_and_counted(tmp_path, small_config):
    write_laion_fixture(tmp_path, n=8, shards=2)
    dataset = build_dataset(small_config(tmp_path, shuffle=False), batch_size=4)
    (tmp_path / "00001.tar").unlink()  # gone after startup: a network blip or a deleted file mid-run
    stream = iter(dataset)
    batches = [next(stream) for _ in range(2)]
    assert batches[0]["state"]["epoch"] == 0 and batches[1]["state"]["epoch"] == 1
    assert DataStats.from_dict(batches[1]["state"]["stats"]).events == {"unreadable_shard": 1}
