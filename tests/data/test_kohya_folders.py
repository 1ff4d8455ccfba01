"""kohya-style image folders (NAME.png + NAME.txt, subfolders, N_name repeats) read through `build_dataset`, the
function `ldm train --data FOLDER` uses: captions, order, skips and counts, repeats, splitting and exact resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_pipeline.data import LoaderState, build_dataset, make_dataloader, open_sources
from ldm_pipeline.data import folders as folders_module
from ldm_pipeline.data.sources import CaptionFolderShard
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError
from tests.fixtures import _payload


def write_image(path: Path, size: tuple[int, int] = (16, 16), shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, ((40 * shade) % 256, 90, 160)).save(path)


def write_folder(root: Path, files: dict[str, str | bytes | None], size: tuple[int, int] = (16, 16)) -> Path:
    """Images (values: caption text, raw caption-file bytes, or None for no caption file) with NAME.txt beside."""
    for i, (name, caption) in enumerate(files.items()):
        write_image(root / name, size, i)
        if caption is not None:
            txt = (root / name).with_suffix(".txt")
            txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return root


def first_epoch(dataset) -> tuple[list[dict], DataStats]:
    """The batches of epoch 0 (one in-process worker) and that whole epoch's DataStats (its last batch may come
    before the last skipped samples are read: the first batch of epoch 1 carries them)."""
    batches = []
    for batch in dataset:
        if batch["state"]["epoch"] > 0:
            return batches, DataStats.from_dict(batch["state"]["stats"])
        batches.append(batch)
    raise AssertionError("the stream ended")


def read_epoch(cfg_factory, root, batch_size=4, **kw) -> tuple[dict[str, str], DataStats]:
    """{key: caption} of one epoch in stored order, and that epoch's DataStats."""
    batches, stats = first_epoch(build_dataset(cfg_factory(root, shuffle=False, **kw), batch_size=batch_size))
    return {k: c for b in batches for k, c in zip(b["keys"], b["captions"])}, stats


def test_recursive_folder_is_detected_and_read_in_sorted_order(tmp_path, small_config):
    write_folder(tmp_path, {"b.png": "bee", "a.jpg": "ay", "sub/c.jpeg": "see", "sub/deep/d.webp": "dee",
                            "e.bmp": "ee", "F.PNG": "upper case extension"})
    shards = open_sources(str(tmp_path))
    assert shards and all(isinstance(s, CaptionFolderShard) for s in shards)
    captions, stats = read_epoch(small_config, tmp_path, batch_size=2)
    assert list(captions) == ["F.PNG", "a.jpg", "b.png", "e.bmp", "sub/c.jpeg", "sub/deep/d.webp"]
    assert captions == {"F.PNG": "upper case extension", "a.jpg": "ay", "b.png": "bee", "e.bmp": "ee",
                        "sub/c.jpeg": "see", "sub/deep/d.webp": "dee"}
    assert stats.used == 6 and not stats.skipped
    # images only in subfolders are found too, and the explicit format reads the same
    only_sub = write_folder(tmp_path / "nested", {"x/y/z.png": "zed"})
    assert read_epoch(small_config, only_sub)[0] == {"x/y/z.png": "zed"}
    assert read_epoch(small_config, only_sub, format="imagefolder")[0] == {"x/y/z.png": "zed"}


def test_symlinked_folders_are_followed_once(tmp_path, small_config):
    write_folder(tmp_path / "elsewhere", {"a.png": "linked in"})
    write_folder(tmp_path / "data", {"b.png": "own"})
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)  # a cycle
    assert read_epoch(small_config, tmp_path / "data")[0] == {"b.png": "own", "linked/a.png": "linked in"}


def test_caption_files_as_kohya_reads_them(tmp_path, small_config):
    write_folder(tmp_path, {
        "bom.png": "\ufeffwith a bom, trailing space \t\r\n\r\n".encode(),
        "lines.png": "first line only\nsecond line\nthird",
        "crlf.png": b"windows line\r\nsecond",
        "unicode.png": "caf\u00e9, \u65e5\u672c, \U0001f600",
        "utf16.png": "notepad unicode\r\nsecond".encode("utf-16"),
        "latin1.png": "caf\u00e9".encode("latin-1"),
        "both.png": "from txt",
        "caption_only.png": None,
    })
    (tmp_path / "both.caption").write_text("from caption")
    (tmp_path / "caption_only.caption").write_text("from .caption\n")
    captions, stats = read_epoch(small_config, tmp_path)
    assert captions == {
        "bom.png": "with a bom, trailing space", "both.png": "from txt", "caption_only.png": "from .caption",
        "crlf.png": "windows line", "latin1.png": "caf\ufffd", "lines.png": "first line only",
        "unicode.png": "caf\u00e9, \u65e5\u672c, \U0001f600", "utf16.png": "notepad unicode",
    }
    assert stats.events.get("caption_not_utf8") == 1 and not stats.skipped
    # data.caption_column picks the extension (kohya's caption_extension, with or without its dot)
    for ext in ("caption", ".caption"):
        captions, stats = read_epoch(small_config, tmp_path, caption_column=ext)
        assert captions == {"both.png": "from caption", "caption_only.png": "from .caption"}
        assert stats.skipped == {"no_caption": 6}


def test_missing_or_empty_caption_is_skipped_and_counted(tmp_path, small_config, caplog):
    write_folder(tmp_path, {"a.png": "kept", "b.png": None, "c.png": "", "d.png": "   \n\n", "e.png": "\nsecond"})
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline.data"):
        captions, stats = read_epoch(small_config, tmp_path)
    assert captions == {"a.png": "kept"}
    assert stats.skipped == {"no_caption": 4} and stats.seen == 5
    assert any("1 of 5 images have no caption file" in r.getMessage() for r in caplog.records)  # only b.png
    captions, stats = read_epoch(small_config, tmp_path, allow_empty_captions=True)
    assert captions == {"a.png": "kept", "b.png": "", "c.png": "", "d.png": "", "e.png": ""}
    # plain images without any caption file (train-vae's input) are no warning
    caplog.clear()
    write_folder(tmp_path / "plain", {"x.png": None, "y.png": None})
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline.data"):
        assert read_epoch(small_config, tmp_path / "plain", allow_empty_captions=True)[0] == {"x.png": "", "y.png": ""}
    assert not caplog.records


def test_hidden_and_non_image_files_are_ignored(tmp_path, small_config):
    write_folder(tmp_path, {"a.png": "visible", "sub/b.png": "visible too", ".hidden/c.png": "hidden folder",
                            "sub/.d.png": "hidden file", "__MACOSX/e.png": "zip debris", "._a.png": "apple double"})
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "a.npz").write_bytes(b"cached latents")
    (tmp_path / "notes.txt").write_text("a caption file without an image")
    (tmp_path / "sub" / "meta.json").write_text("{}")
    captions, stats = read_epoch(small_config, tmp_path)
    assert captions == {"a.png": "visible", "sub/b.png": "visible too"} and stats.seen == 2


def test_broken_images_are_skipped_and_counted(tmp_path, small_config):
    write_folder(tmp_path, {f"ok{i}.png": f"good {i}" for i in range(3)})
    for kind in ("corrupt", "truncated", "not_image"):
        _, data, _ = _payload(kind, 0, (16, 16), 0)
        (tmp_path / f"{kind}.jpg").write_bytes(data)
        (tmp_path / f"{kind}.txt").write_text(f"a {kind} image")
    (tmp_path / "empty.webp").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("zero bytes")
    dataset = build_dataset(small_config(tmp_path, shuffle=False), batch_size=2)
    (tmp_path / "ok1.png").unlink()  # deleted after startup
    batches, stats = first_epoch(dataset)
    assert sorted(k for b in batches for k in b["keys"]) == ["ok0.png", "ok2.png"]
    assert stats.skipped == {"corrupt_image": 1, "truncated_image": 1, "not_image": 2, "missing_file": 1}


def test_repeat_folders_count_n_times_and_name_captions(tmp_path, small_config, caplog):
    write_folder(tmp_path, {"3_mychar/a.png": "a, mychar", "3_mychar/b.png": None, "3_mychar/pose/c.png": "c",
                            "1_sks dog/d.png": None, "2_style_v2/e.png": "", "plain/f.png": "f", "g.png": "g",
                            "0_unused/h.png": "h", "extra/2_nested/i.png": "i"})
    with caplog.at_level(logging.INFO, logger="ldm_pipeline.data"):
        captions, stats = read_epoch(small_config, tmp_path, batch_size=3)
    base = {"3_mychar/a.png": "a, mychar", "3_mychar/b.png": "mychar", "3_mychar/pose/c.png": "c",
            "1_sks dog/d.png": "sks dog", "2_style_v2/e.png": "style_v2", "plain/f.png": "f", "g.png": "g",
            "extra/2_nested/i.png": "i"}  # only folders right inside the data folder carry a repeat count
    repeats = {"3_mychar/a.png": 3, "3_mychar/b.png": 3, "3_mychar/pose/c.png": 3, "2_style_v2/e.png": 2}
    expected = {f"{k}#{r}" if r else k: v for k, v in base.items() for r in range(repeats.get(k, 1))}
    assert captions == expected and stats.used == len(expected) == 15 and not stats.skipped
    assert any("3_mychar 3 x 3" in r.getMessage() for r in caplog.records)
    # stored order: every image once, then the second copies, then the third (never a copy next to itself)
    assert list(captions) == [*sorted(base), "2_style_v2/e.png#1", "3_mychar/a.png#1", "3_mychar/b.png#1",
                              "3_mychar/pose/c.png#1", "3_mychar/a.png#2", "3_mychar/b.png#2", "3_mychar/pose/c.png#2"]
    # the class tokens caption only images without a caption; others stay no_caption
    write_folder(tmp_path / "x", {"2_tok/a.png": None, "untagged/b.png": None})
    assert read_epoch(small_config, tmp_path / "x")[1].skipped == {"no_caption": 1}


def test_shards_split_across_ranks_without_overlap(tmp_path, small_config, monkeypatch):
    monkeypatch.setattr(folders_module, "CAPTION_FOLDER_CHUNK", (3, 3))
    write_folder(tmp_path, {**{f"2_rep/{i:02d}.png": f"rep {i}" for i in range(4)},
                            **{f"plain/{i:02d}.png": f"plain {i}" for i in range(7)}})
    assert len(open_sources(str(tmp_path), min_shards=4)) == 4  # 11 images in ranges of 3
    for shards_wanted in (4, 1):  # by shard (4 shards, 2 ranks) or by sample (chunk larger than the folder)
        if shards_wanted == 1:
            monkeypatch.setattr(folders_module, "CAPTION_FOLDER_CHUNK", (64, 64))
        seen: list[str] = []
        for rank in range(2):
            dataset = build_dataset(small_config(tmp_path), batch_size=2, rank=rank, world_size=2)
            assert len(dataset.shards) == shards_wanted
            seen += [k for b in first_epoch(dataset)[0] for k in b["keys"]]
        assert len(seen) == len(set(seen)) == 4 * 2 + 7


def test_exact_resume_two_workers(tmp_path, small_config, tokenizer, monkeypatch):
    monkeypatch.setattr(folders_module, "CAPTION_FOLDER_CHUNK", (5, 5))
    sizes = ((16, 24), (24, 16), (16, 16), (32, 16))
    for i in range(14):
        folder = "2_tagged" if i < 4 else f"group{i % 3}"
        write_image(tmp_path / folder / f"{i:02d}.png", sizes[i % 4], i)
        (tmp_path / folder / f"{i:02d}.txt").write_text(f"sample {i}, tag{i % 3}, color{i % 5}")
    config = small_config(tmp_path, resolution=16, bucketing=True, bucket_step=8, center_crop=False,
                          random_flip=True, caption_dropout=0.3, shuffle_tags=True, keep_tags=1, num_workers=2)

    def loader(state=None):
        return make_dataloader(build_dataset(config, batch_size=2, tokenizer=tokenizer), 2, state)

    assert len(build_dataset(config, batch_size=2).shards) == 3
    k, m = 4, 10  # 18 samples per epoch: m crosses into epoch 1
    reference, state = [], LoaderState()
    for i, batch in enumerate(loader()):
        if i < k:
            state.update(batch["state"])
        reference.append(batch)
        if len(reference) == k + m:
            break
    assert any(s["pending"] for s in state.workers.values())  # half-filled buckets must come back
    resumed = []
    for batch in loader(json.loads(json.dumps(state.to_dict()))):
        resumed.append(batch)
        if len(resumed) == m:
            break
    for want, got in zip(reference[k:], resumed):
        assert got["keys"] == want["keys"] and got["captions"] == want["captions"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert got["state"] == want["state"]
    assert {0, 1} <= {b["state"]["epoch"] for b in resumed}  # across an epoch boundary


def test_user_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "a.txt").write_text("a caption without its image")
    (tmp_path / "text_only" / ".hidden.png").write_bytes(b"")
    for folder in ("empty", "text_only"):
        with pytest.raises(UserError, match="no \\*.tar, \\*.parquet, metadata.jsonl/metadata.csv or images") as e:
            open_sources(str(tmp_path / folder))
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="no images .* in it or its subfolders"):
            open_sources(str(tmp_path / folder), "imagefolder")
    write_folder(tmp_path / "zero", {"0_off/a.png": "a"})
    with pytest.raises(UserError, match="0 repeats"):
        open_sources(str(tmp_path / "zero"))
    write_image(tmp_path / "one.png")
    with pytest.raises(UserError, match="must be a directory"):
        open_sources(str(tmp_path / "one.png"), "imagefolder")


def test_metadata_file_wins_over_caption_files(tmp_path, small_config):
    write_folder(tmp_path, {"a.png": "from txt", "b.png": "from txt"})
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n")
    assert read_epoch(small_config, tmp_path)[0] == {"a.png": "from metadata"}


def test_training_runs_on_a_kohya_folder(tiny_model, tmp_path):
    """`ldm train --data FOLDER` in-process: two steps of the tiny model on a kohya folder."""
    from accelerate.state import AcceleratorState, GradientState

    from ldm_pipeline.training import train
    from ldm_pipeline.training.config import load_train_config

    data = write_folder(tmp_path / "data", {f"2_shape/{i}.png": f"sample {i}, tag{i % 3}" for i in range(3)},
                        size=(32, 32))
    out = tmp_path / "run"
    config = load_train_config("tiny_test", {"model": str(tiny_model), "output_dir": str(out),
                                             "data": {"source": str(data)}, "max_steps": 2, "checkpoint_every": 0,
                                             "gradient_accumulation_steps": 1, "ema": {"enabled": False},
                                             "report_to": "none"})
    try:
        res = train(config)
    finally:  # accelerate keeps process-wide singletons
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert res.global_step == 2 and res.bad_steps == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["used"] >= 4 and not metrics["data"]["skipped"]
    assert (out / "final" / "model_index.json").is_file()
