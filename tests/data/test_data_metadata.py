"""Malformed metadata rows and files are skipped and counted; image-folder metadata and HF datasets stream; a
UserError raised in a DataLoader worker stays one line."""

from __future__ import annotations

import json
import pickle
import sys
import types

import pytest

from ldm_pipeline.data import build_dataset, make_dataloader, open_sources
from ldm_pipeline.data import folders as folders_module
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError
from tests.fixtures import write_imagefolder_fixture, write_laion_fixture, write_parquet_fixture


def _epoch_stats(batches) -> DataStats:
    total = DataStats()
    last: dict = {}
    for b in batches:
        last[b["state"]["worker"]] = b["state"]
    for s in last.values():
        total = total.merge(DataStats.from_dict(s["epoch_stats"]))
    return total


@pytest.mark.parametrize("chunk", [None, (64, 128)])  # one byte range, or many (rows cut across range ends)
def test_bad_jsonl_rows_are_skipped_and_counted(tmp_path, small_config, take_epoch, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(folders_module, "METADATA_CHUNK_BYTES", chunk)
    write_imagefolder_fixture(tmp_path, n=8)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    # a broken line, a JSON list, a row without file_name and a blank line, between good rows
    lines[2:2] = ['{"file_name": "images/00002.jpg", "text": ', "[1, 2, 3]", '{"text": "no file"}', ""]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    shards = open_sources(str(tmp_path))
    assert (len(shards) > 1) == bool(chunk)
    batches = take_epoch(iter(build_dataset(small_config(tmp_path), batch_size=3)))
    keys = sorted(k for b in batches for k in b["keys"])
    assert keys == [f"images/{i:05d}.jpg" for i in range(8)]  # every good row, once, none lost after a bad one
    assert _epoch_stats(batches).skipped == {"bad_metadata": 3}


def test_csv_multiline_caption_across_byte_ranges(tmp_path, small_config, take_epoch, monkeypatch):
    monkeypatch.setattr(folders_module, "METADATA_CHUNK_BYTES", (40, 80))
    write_imagefolder_fixture(tmp_path, n=9, metadata="csv")
    rows = (tmp_path / "metadata.csv").read_text().splitlines()
    assert rows[3].startswith('images/00002.jpg,"sample 2, ')
    rows[3] = rows[3].replace('"sample 2, ', '"sample 2\nline two, ""quoted"", ', 1)  # a record over two lines
    rows.insert(5, "only,three,fields,too,many")  # more fields than the header
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert len(open_sources(str(tmp_path))) > 2
    batches = take_epoch(iter(build_dataset(small_config(tmp_path), batch_size=4)))
    captions = {k: c for b in batches for k, c in zip(b["keys"], b["captions"])}
    assert sorted(captions) == [f"images/{i:05d}.jpg" for i in range(9)]
    assert captions["images/00002.jpg"].startswith('sample 2\nline two, "quoted", ')
    assert _epoch_stats(batches).skipped == {"bad_metadata": 1}


def test_unreadable_metadata_is_a_startup_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metadata.jsonl").write_text("not json\n[1]\n\n")
    with pytest.raises(UserError, match="no readable row"):
        open_sources(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(UserError, match="no rows"):
        open_sources(str(tmp_path / "b"))


@pytest.mark.parametrize("min_shards", [1, 8])  # one shard per file, or per row group
def test_bad_first_parquet_file_is_skipped(tmp_path, small_config, take_epoch, min_shards):
    write_parquet_fixture(tmp_path, n=6, files=2, row_group_size=2)
    (tmp_path / "00000.parquet").write_bytes(b"this is not parquet")
    shards = open_sources(str(tmp_path), min_shards=min_shards)
    assert len(shards) >= 2
    batches = take_epoch(iter(build_dataset(small_config(tmp_path), batch_size=2)))
    assert len({k for b in batches for k in b["keys"]}) == 3  # the good file's samples
    assert _epoch_stats(batches).events.get("unreadable_shard") == 1
    (tmp_path / "00001.parquet").write_bytes(b"nor this")
    with pytest.raises(UserError, match="no readable parquet"):
        open_sources(str(tmp_path))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_large_metadata_is_not_held_in_memory(tmp_path, monkeypatch, fmt):
    n = 40_000
    rows = [{"file_name": f"images/{i:06d}.jpg", "text": f"caption number {i}, tag{i % 7}"} for i in range(n)]
    if fmt == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(
            f'{r["file_name"]},"{r["text"]}"\n' for r in rows))
    size = (tmp_path / f"metadata.{fmt}").stat().st_size
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(folders_module.json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    dataset = build_dataset(sources_module_config(tmp_path), batch_size=2)
    assert len(parsed) <= 1  # startup parsed the first row at most
    assert len(pickle.dumps(dataset)) < size / 50  # what a worker gets: no rows, no per-row offsets
    shard = dataset.shards[0]
    first = next(shard.iterate(None, 0, None, DataStats()))[1]  # a shard reads its own range when iterated
    assert first.key == "images/000000.jpg" and first.caption.startswith("caption number 0")


def sources_module_config(path):
    from ldm_pipeline.data import DataConfig

    return DataConfig(source=str(path), resolution=32, num_workers=0)


def test_hf_dataset_is_streamed(monkeypatch, small_config, take_epoch):
    from tests.fixtures import _encode, fixture_image

    calls = []

    class FakeImage:
        def __init__(self, decode=True):
            self.decode = decode

    class FakeStream:
        def __init__(self, rows, n_shards=2):
            self.rows, self.n_shards = rows, n_shards
            self.column_names = ["image", "text", "score"]
            self.features = {"image": FakeImage(), "text": None, "score": None}

        def shard(self, num_shards, index):
            return FakeStream(self.rows[index::num_shards], 1)

        def cast_column(self, name, feature):
            calls.append(("cast", name, feature.decode))
            return self

        def __iter__(self):
            return iter(self.rows)

    rows = [{"image": {"bytes": _encode(fixture_image(i), "PNG"), "path": None}, "text": f"a sample {i}", "score": i}
            for i in range(5)]

    def load_dataset(name, split, streaming=False):
        calls.append(("load", name, split, streaming))
        return FakeStream(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset, Image=FakeImage))
    shards = open_sources("someone/images", "hf")
    assert calls[:2] == [("load", "someone/images", "train", True), ("cast", "image", False)]
    assert len(shards) == 2
    batches = take_epoch(iter(build_dataset(small_config("someone/images", format="hf", shuffle_buffer=2),
                                            batch_size=2)))
    assert sorted(c for b in batches for c in b["captions"]) == [f"a sample {i}" for i in range(5)]


def test_worker_user_error_is_one_line(tmp_path, small_config):
    write_laion_fixture(tmp_path, n=0, shards=1, odd=("corrupt", "not_image"))  # nothing usable
    loader = make_dataloader(build_dataset(small_config(tmp_path, num_workers=1), batch_size=2), 1)
    with pytest.raises(UserError) as e:
        next(iter(loader))
    assert "no usable sample" in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)
