"""The shapes domain: rendering, the position rule, sampling, captions and img2dataset-layout shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.errors import UserError
from ldm_pipeline.shapes.domain import (
    CAPTION_TEMPLATES,
    COLOURS,
    HELD_OUT,
    MAX_SIZE,
    MIN_SIZE,
    POSITION_MARGIN,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    canonical_prompt,
    caption,
    eval_prompts,
    position_label,
    position_margin,
    render,
    sample_spec,
    write_shards,
)


def test_render_draws_the_spec():
    img = render(ShapeSpec("red", "square", "blue", cx=20, cy=40, size=20))
    arr = np.asarray(img)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert tuple(arr[40, 20]) == COLOURS["red"] and tuple(arr[0, 0]) == COLOURS["blue"]
    assert tuple(arr[40, 9]) == COLOURS["blue"] and tuple(arr[40, 10]) == COLOURS["red"]  # edge at x = 20 - 10
    red = (np.abs(arr.astype(int) - COLOURS["red"]).sum(-1) < 30).sum()
    assert abs(red - 400) <= 4


def test_render_anti_aliases_and_triangle_is_upright():
    arr = np.asarray(render(ShapeSpec("white", "triangle", "black", size=33))).astype(int)
    levels = set(np.unique(arr[..., 0]).tolist())
    assert len(levels) > 4  # partial coverage at the edges, not just two colours
    widths = (arr[..., 0] > 132).sum(1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[1]] < widths[rows[-2]] / 4  # narrow apex at the top, wide base at the bottom
    circle = np.asarray(render(ShapeSpec("white", "circle", "black", size=33)))[..., 0] > 132
    assert abs(circle.sum() - np.pi * 33**2 / 4) < 20


def test_shade_override_is_drawn():
    arr = np.asarray(render(ShapeSpec("red", "circle", "blue", colour_rgb=(210, 45, 33), background_rgb=(44, 77, 228))))
    assert tuple(arr[32, 32]) == (210, 45, 33) and tuple(arr[0, 0]) == (44, 77, 228)


@pytest.mark.parametrize("cx, cy, label", [
    (32, 32, "in the center"), (42, 22, "in the center"), (10, 32, "on the left"), (54, 30, "on the right"),
    (32, 8, "at the top"), (30, 58, "at the bottom"), (10, 12, "on the left"), (12, 10, "at the top"),
    (43, 32, "on the right"),  # dx = 11/64 > 1/6: just outside the middle third
])
def test_position_rule(cx, cy, label):
    assert position_label(cx, cy) == label


def test_position_margin_is_distance_to_the_rule_boundaries():
    assert position_margin(32, 32) == pytest.approx(64 / 6)
    assert position_margin(10, 32) == pytest.approx(22 - 64 / 6)
    assert position_margin(12, 12) == pytest.approx(0)  # on the left/top diagonal


def test_spec_rejects_unknown_names_and_invisible_shapes():
    with pytest.raises(UserError, match="unknown colour"):
        ShapeSpec("pink", "circle", "blue")
    with pytest.raises(UserError, match="unknown shape"):
        ShapeSpec("red", "hexagon", "blue")
    with pytest.raises(UserError, match="invisible"):
        ShapeSpec("red", "circle", "red")


def test_sample_spec_stays_in_the_domain():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(10_000)]
    assert not any((s.colour, s.shape) in HELD_OUT for s in specs)
    assert all(s.colour != s.background for s in specs)
    assert all(MIN_SIZE <= s.size <= MAX_SIZE for s in specs)
    assert all(s.cx - s.size / 2 >= 0 and s.cx + s.size / 2 <= 64 for s in specs)
    assert all(s.cy - s.size / 2 >= 0 and s.cy + s.size / 2 <= 64 for s in specs)
    assert all(s.position == position_label(s.cx, s.cy) for s in specs)
    combos = {(s.colour, s.shape) for s in specs}
    assert len(combos) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)
    assert {s.position for s in specs if s.position_is_clear} == set(POSITIONS)
    assert {s.size for s in specs} == set(range(MIN_SIZE, MAX_SIZE + 1))
    with_held_out = [sample_spec(rng, allow_held_out=True) for _ in range(2000)]
    assert {(s.colour, s.shape) for s in with_held_out} >= HELD_OUT


def test_captions_use_every_phrasing_and_name_only_clear_positions():
    rng = np.random.default_rng(1)
    seen_templates, off_centre_without_position = set(), 0
    for _ in range(3000):
        spec = sample_spec(rng)
        text = caption(spec, rng)
        named = next((p for p in POSITIONS if text.endswith(", " + p)), None)
        if named:
            assert named == spec.position and position_margin(spec.cx, spec.cy) >= POSITION_MARGIN
            text = text[: -len(named) - 2]
        elif spec.position != "in the center":
            off_centre_without_position += 1
        assert spec.colour in text and spec.shape in text and spec.background in text
        seen_templates |= {i for i, t in enumerate(CAPTION_TEMPLATES) if _fits(t, spec, text)}
    assert seen_templates == set(range(len(CAPTION_TEMPLATES))) and len(CAPTION_TEMPLATES) >= 6
    assert off_centre_without_position > 100


def _fits(template: str, spec: ShapeSpec, text: str) -> bool:
    art = {c: ("an " if c[0] in "aeiou" else "a ") + c for c in COLOURS}
    return template.format(colour=spec.colour, shape=spec.shape, background=spec.background,
                           a_colour=art[spec.colour], a_background=art[spec.background]) == text


def test_canonical_prompt():
    assert canonical_prompt("red", "circle", "blue") == "a red circle on a blue background"
    assert canonical_prompt("orange", "square", "white", "on the left") == \
        "an orange square on a white background, on the left"
    assert canonical_prompt("green", "triangle", "orange") == "a green triangle on an orange background"
    with pytest.raises(UserError, match="position"):
        canonical_prompt("red", "circle", "blue", "top left")


def test_eval_prompts_are_fixed_and_split():
    prompts = eval_prompts()
    assert prompts == eval_prompts()
    assert len(prompts["held_out"]) == len(HELD_OUT) * (len(COLOURS) - 1)
    assert all(any(f"{c} {s} " in p for c, s in HELD_OUT) for p in prompts["held_out"])
    assert not any(f"{c} {s} " in p for p in prompts["held_in"] + prompts["position"] for c, s in HELD_OUT)
    assert len(prompts["held_in"]) == 2 * (len(COLOURS) * len(SHAPES) - len(HELD_OUT))
    assert len(set(prompts["held_in"])) == len(prompts["held_in"])
    assert len(prompts["position"]) == 5 * 8 and all(any(p.endswith(q) for q in POSITIONS) for p in prompts["position"])
    backgrounds = [p.split(" on a")[1] for p in prompts["held_in"]]
    counts = {c: sum(c in b for b in backgrounds) for c in COLOURS}
    assert max(counts.values()) - min(counts.values()) <= 3  # backgrounds rotate: balanced


# --- shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = write_shards(out / "a", num_samples=120, seed=3, samples_per_shard=50)
    write_shards(out / "b", num_samples=120, seed=3, samples_per_shard=50)
    write_shards(out / "c", num_samples=120, seed=4, samples_per_shard=50)
    return out, summary


def test_shards_are_deterministic_per_seed(shards):
    out, _ = shards
    for name in ("00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00002.parquet"):
        assert (out / "a" / name).read_bytes() == (out / "b" / name).read_bytes(), name
        assert (out / "a" / name).read_bytes() != (out / "c" / name).read_bytes(), name


def test_shard_layout_is_img2dataset(shards):
    import pyarrow.parquet as pq

    out, summary = shards
    d = out / "a"
    assert summary.tars == [d / f"{s:05d}.tar" for s in range(3)] and summary.num_samples == 120
    assert sorted(p.name for p in d.iterdir()) == sorted(
        f"{s:05d}{ext}" for s in range(3) for ext in (".tar", ".parquet", "_stats.json"))
    with tarfile.open(d / "00001.tar") as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
        assert len(names) == 150 and names[-1] == "000010049.json"
        assert {m.mtime for m in members} == {members[0].mtime} and {m.uid for m in members} == {0}
        jpg = tf.extractfile("000010007.jpg").read()
        txt = tf.extractfile("000010007.txt").read().decode()
        meta = json.loads(tf.extractfile("000010007.json").read())
    assert set(meta) >= {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                         "original_height", "exif", "sha256", "colour", "shape", "background", "position", "cx", "cy",
                         "size", "similarity", "punsafe", "pwatermark", "aesthetic"}
    assert meta["key"] == "000010007" and meta["url"] == "shapes://000010007" and meta["status"] == "success"
    assert meta["caption"] == txt and meta["exif"] is None and meta["sha256"] == hashlib.sha256(jpg).hexdigest()
    assert 0 <= meta["punsafe"] <= 1 and 0 <= meta["pwatermark"] <= 1 and 0 < meta["similarity"] < 1
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.size == (64, 64) == (meta["width"], meta["height"])
    table = pq.read_table(d / "00001.parquet")
    assert table.num_rows == 50 and "jpg" not in table.column_names
    assert table.column_names[:11] == ["url", "caption", "key", "status", "error_message", "width", "height",
                                       "original_width", "original_height", "exif", "sha256"]
    assert table.column("key").to_pylist()[7] == "000010007" and table.column("caption").to_pylist()[7] == txt
    stats = json.loads((d / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 20 and stats["status_dict"] == {"success": 20}
    assert stats["failed_to_download"] == stats["failed_to_resize"] == 0 and stats["duration"] >= 0


def test_shards_hold_what_their_metadata_says(shards):
    import pyarrow.parquet as pq

    from ldm_pipeline.shapes.domain import ShapeSpec

    out, _ = shards
    rows = [r for s in range(3) for r in pq.read_table(out / "a" / f"{s:05d}.parquet").to_pylist()]
    assert len(rows) == 120 and not any((r["colour"], r["shape"]) in HELD_OUT for r in rows)
    with tarfile.open(out / "a" / "00000.tar") as tf:
        jpg = tf.extractfile("000000003.jpg").read()
    r = rows[3]
    clean = np.asarray(render(ShapeSpec(r["colour"], r["shape"], r["background"], r["cx"], r["cy"], r["size"])))
    got = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    assert np.abs(got.astype(int) - clean.astype(int)).mean() < 12  # the same picture, up to shade jitter and JPEG


def test_data_layer_reads_the_shards(shards):
    from ldm_pipeline.data import open_sources
    from ldm_pipeline.data.stats import DataStats

    out, _ = shards
    samples = [raw for s in open_sources(str(out / "a")) for _, raw in s.iterate(None, 0, None, DataStats())]
    assert len(samples) == 120 and all(raw.caption and raw.image[:2] == b"\xff\xd8" for raw in samples)
    assert samples[0].meta["shape"] in SHAPES


def test_workers_give_the_same_bytes(tmp_path):
    write_shards(tmp_path / "one", num_samples=40, seed=9, samples_per_shard=20)
    write_shards(tmp_path / "two", num_samples=40, seed=9, samples_per_shard=20, workers=2)
    for name in ("00000.tar", "00001.tar", "00001.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_write_shards_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="samples_per_shard"):
        write_shards(tmp_path, num_samples=10, samples_per_shard=20_000)
    with pytest.raises(UserError, match="num_samples"):
        write_shards(tmp_path, num_samples=0)
