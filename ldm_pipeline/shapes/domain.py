"""The shapes domain of the shipped model: one coloured shape on a plain background, captions, and shards.

The domain is small and fixed so that prompt adherence can be measured exactly (`ldm_pipeline.shapes.scoring`
reads colour, shape, background and position back from pixels):

* 64×64 RGB images; colours from `COLOURS` (training shades jitter ±8 per channel), shapes from `SHAPES`
  (axis-aligned square, circle, upright triangle with the apex at the top, all `size` px wide and tall).
* one shape of one colour on a plain background of another colour, size 16–40 px, fully inside the image.
* `HELD_OUT` (colour, shape) pairs are never drawn for training, so prompts naming them measure compositional
  generalization: the model has seen green and triangles, never a green triangle.

Position rule (`position_label`), on the centre of the shape's bounding box, in fractions of the image size:
``dx = cx / width - 0.5``, ``dy = cy / height - 0.5``. ``|dx| < 1/6 and |dy| < 1/6`` (the middle third both
ways) is "in the center"; otherwise the axis with the larger offset decides: ``|dx| >= |dy|`` gives "on the
left" (dx < 0) or "on the right", else "at the top" (dy < 0) or "at the bottom". A caption names a position only
when the centre is at least `POSITION_MARGIN` px from every decision boundary, so a named position is never a
coin toss; `sample_spec` places half of its shapes clearly inside a chosen region for that reason.

`write_shards` writes what img2dataset writes (webdataset tars + parquet + stats json) so the training data
layer reads the synthetic set exactly like a LAION download::

    from ldm_pipeline.shapes.domain import write_shards
    write_shards("data/shapes", num_samples=50_000, seed=0)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldm_pipeline.errors import UserError

IMAGE_SIZE = 64  # width and height of every image, px
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
# never drawn for training, in any phrasing: they measure compositional generalization
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("white", "circle")})
MIN_SIZE, MAX_SIZE = 16, 40  # shape side / diameter, px
SHADE_JITTER = 8  # training shades vary by up to this much per channel so the model learns colour names, not codes
POSITION_MARGIN = 3.0  # px a named position keeps from every decision boundary of the position rule
CENTER_FRACTION = 1 / 6  # |offset| below this (fraction of the image) both ways is "in the center"
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: exact area anti-aliasing

# The canonical phrasing first; every phrasing may get ", {position}" appended. {a_colour} is "a red"/"an orange".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_colour} {shape} on {a_background} background",
    "{colour} {shape}, {background} background",
    "a {shape} in {colour} against {background}",
    "{background} background with {a_colour} {shape}",
    "{a_colour} {shape} drawn on {background}",
    "a picture of {a_colour} {shape} on {background}",
    "a {shape}, coloured {colour}, on a plain {background} background",
    "simple flat illustration of {a_colour} {shape} over {a_background} backdrop",
)

# extra columns img2dataset copies from LAION parquet: plausible values so data filters have something to read
_TAR_MTIME = 1_704_067_200  # 2024-01-01: a fixed mtime keeps the tar bytes identical between runs
_KEY_SAMPLE_DIGITS = 4  # img2dataset keys: 5-digit shard id + 4-digit index in the shard (10,000 per shard)


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def position_label(cx: float, cy: float, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> str:
    """The position phrase of a shape centred at (cx, cy) px, by the rule in the module docstring."""
    dx, dy = cx / width - 0.5, cy / height - 0.5
    if abs(dx) < CENTER_FRACTION and abs(dy) < CENTER_FRACTION:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def position_margin(cx: float, cy: float, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE) -> float:
    """Distance in px (of a square image) from (cx, cy) to the nearest boundary of the position rule's regions."""
    scale = min(width, height)
    dx, dy = abs(cx / width - 0.5), abs(cy / height - 0.5)
    t = CENTER_FRACTION
    if dx < t and dy < t:
        return min(t - dx, t - dy) * scale
    return min(abs(dx - dy), max(dx - t, dy - t)) * scale


def _check_name(kind: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {kind} {value!r}; expected one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image. (cx, cy) is the centre of the shape's bounding box in px."""

    colour: str
    shape: str
    background: str
    cx: int = IMAGE_SIZE // 2
    cy: int = IMAGE_SIZE // 2
    size: int = 32  # side (square, triangle base and height) or diameter (circle), px
    position: str | None = None  # position label of (cx, cy); filled in from the rule when left out
    colour_rgb: tuple[int, int, int] | None = None  # the drawn shade; None = the palette value of `colour`
    background_rgb: tuple[int, int, int] | None = None  # likewise for `background`

    def __post_init__(self) -> None:
        _check_name("colour", self.colour, COLOURS)
        _check_name("background colour", self.background, COLOURS)
        _check_name("shape", self.shape, SHAPES)
        if self.colour == self.background:
            raise UserError(f"shape and background are both {self.colour}: the shape would be invisible")
        if self.position is None:
            object.__setattr__(self, "position", position_label(self.cx, self.cy))

    @property
    def position_is_clear(self) -> bool:
        """Whether the centre is far enough from the region boundaries for a caption to name the position."""
        return position_margin(self.cx, self.cy) >= POSITION_MARGIN


def render(spec: ShapeSpec) -> Image.Image:
    """The 64×64 RGB image of `spec`: the shape's coverage mask drawn at 4× and box-filtered, then composited."""
    ss = SUPERSAMPLE
    # bounding box in supersampled px; with an integer centre and size these are integers (a half px × 4)
    x0, y0 = round((spec.cx - spec.size / 2) * ss), round((spec.cy - spec.size / 2) * ss)
    x1, y1 = x0 + spec.size * ss - 1, y0 + spec.size * ss - 1  # PIL boxes include both ends
    mask = Image.new("L", (IMAGE_SIZE * ss, IMAGE_SIZE * ss), 0)
    draw = ImageDraw.Draw(mask)
    if spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:  # upright triangle: apex at the top centre, base along the bottom edge
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    fg = Image.new("RGB", mask.size, spec.colour_rgb or COLOURS[spec.colour])
    bg = Image.new("RGB", mask.size, spec.background_rgb or COLOURS[spec.background])
    return Image.composite(fg, bg, mask)


def allowed_combos(allow_held_out: bool = False) -> list[tuple[str, str]]:
    """(colour, shape) pairs in a fixed order; the held-out ones only when asked for."""
    return [(c, s) for c in COLOURS for s in SHAPES if allow_held_out or (c, s) not in HELD_OUT]


def _place(rng: np.random.Generator, size: int, target: str | None) -> tuple[int, int] | None:
    """A centre keeping the shape 1 px inside the image; with `target`, clearly inside that position's region."""
    lo, hi = math.ceil(size / 2) + 1, IMAGE_SIZE - math.ceil(size / 2) - 1
    for _ in range(200 if target else 1):
        cx, cy = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        if target is None or (position_label(cx, cy) == target and position_margin(cx, cy) >= POSITION_MARGIN):
            return cx, cy
    return None


def _shade(rng: np.random.Generator, name: str, jitter: int) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.array(COLOURS[name]) + rng.integers(-jitter, jitter + 1, size=3), 0, 255))
    return r, g, b


def sample_spec(rng: np.random.Generator, allow_held_out: bool = False, jitter: int = SHADE_JITTER,
                positioned_fraction: float = 0.5) -> ShapeSpec:
    """A random spec: uniform over allowed (colour, shape) pairs, a different background, size 16–40 px.

    `positioned_fraction` of the specs are placed clearly inside a uniformly chosen position region (so captions
    can name it); the rest anywhere inside the image. `jitter` varies the drawn shades (0 = palette values).
    """
    combos = allowed_combos(allow_held_out)
    colour, shape = combos[int(rng.integers(len(combos)))]
    backgrounds = [c for c in COLOURS if c != colour]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    target = POSITIONS[int(rng.integers(len(POSITIONS)))] if rng.random() < positioned_fraction else None
    max_size = MAX_SIZE
    while True:  # off-centre regions cannot hold the largest shapes clearly: shrink until one fits
        size = int(rng.integers(MIN_SIZE, max_size + 1))
        centre = _place(rng, size, target)
        if centre is not None:
            break
        max_size = max(MIN_SIZE, max_size - 4)
    colour_rgb = _shade(rng, colour, jitter) if jitter else None
    background_rgb = _shade(rng, background, jitter) if jitter else None
    return ShapeSpec(colour, shape, background, centre[0], centre[1], size, None, colour_rgb, background_rgb)


def format_caption(template: str, colour: str, shape: str, background: str, position: str | None = None) -> str:
    """One caption phrasing filled in; `position` (one of POSITIONS) is appended after a comma."""
    text = template.format(colour=colour, shape=shape, background=background, a_colour=_article(colour),
                           a_background=_article(background))
    return f"{text}, {position}" if position else text


def canonical_prompt(colour: str, shape: str, background: str, position: str | None = None) -> str:
    """``a {colour} {shape} on a {background} background[, {position}]`` ("an" before orange)."""
    _check_name("colour", colour, COLOURS)
    _check_name("shape", shape, SHAPES)
    _check_name("background colour", background, COLOURS)
    if position is not None:
        _check_name("position", position, POSITIONS)
    return format_caption(CAPTION_TEMPLATES[0], colour, shape, background, position)


def caption(spec: ShapeSpec, rng: np.random.Generator, position_prob: float = 0.7) -> str:
    """A caption for `spec` in a random phrasing; it names the position (with probability `position_prob`)
    only when the position is clear, so some off-centre shapes get captions without one."""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    named = spec.position_is_clear and rng.random() < position_prob
    return format_caption(template, spec.colour, spec.shape, spec.background, spec.position if named else None)


def eval_prompts(backgrounds_per_held_in: int = 2, prompts_per_position: int = 8,
                 seed: int = 0) -> dict[str, list[str]]:
    """A fixed prompt set for evaluation, all in the canonical phrasing.

    ``held_out``: every held-out pair on every other background (4 × 7). ``held_in``: every trained pair on
    `backgrounds_per_held_in` backgrounds, rotated so the backgrounds stay balanced. ``position``: trained pairs
    with each of the five positions, `prompts_per_position` each. Same arguments, same list.
    """
    rng = np.random.default_rng(seed)
    held_out = [canonical_prompt(c, s, b) for c, s in sorted(HELD_OUT) for b in COLOURS if b != c]
    held_in, k = [], 0
    for c, s in allowed_combos():
        backgrounds = [b for b in COLOURS if b != c]
        for _ in range(backgrounds_per_held_in):
            held_in.append(canonical_prompt(c, s, backgrounds[k % len(backgrounds)]))
            k += 1
    combos = allowed_combos()
    position = []
    for p in POSITIONS:
        for _ in range(prompts_per_position):
            c, s = combos[int(rng.integers(len(combos)))]
            backgrounds = [b for b in COLOURS if b != c]
            position.append(canonical_prompt(c, s, backgrounds[int(rng.integers(len(backgrounds)))], p))
    return {"held_in": held_in, "held_out": held_out, "position": position}


# --- img2dataset-layout shards


@dataclass
class ShardSummary:
    """What `write_shards` wrote: the tar paths plus counts and timing (for logs and the speed check)."""

    tars: list[Path] = field(default_factory=list)
    num_samples: int = 0
    seconds: float = 0.0


def _sample(seed: int, index: int, key: str) -> tuple[bytes, str, dict[str, Any]]:
    """(jpg bytes, caption, json metadata) of sample `index`; its own rng makes it independent of the others."""
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(rng)
    text = caption(spec, rng)
    buf = io.BytesIO()
    render(spec).save(buf, format="JPEG", quality=95)
    jpg = buf.getvalue()
    meta = {
        "url": f"shapes://{key}", "caption": text, "key": key, "status": "success", "error_message": None,
        "width": IMAGE_SIZE, "height": IMAGE_SIZE, "original_width": IMAGE_SIZE, "original_height": IMAGE_SIZE,
        "exif": None, "sha256": hashlib.sha256(jpg).hexdigest(),
        "colour": spec.colour, "shape": spec.shape, "background": spec.background,
        "position": spec.position, "cx": spec.cx, "cy": spec.cy, "size": spec.size,
        # LAION-like columns: a synthetic caption matches its image well, is safe, unwatermarked, middling pretty
        "similarity": round(float(rng.uniform(0.30, 0.40)), 4), "punsafe": round(float(rng.uniform(0.0, 0.02)), 5),
        "pwatermark": round(float(rng.uniform(0.0, 0.1)), 5), "aesthetic": round(float(rng.uniform(4.5, 6.0)), 4),
    }
    return jpg, text, meta


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
        ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
        ("sha256", pa.string()), ("colour", pa.string()), ("shape", pa.string()), ("background", pa.string()),
        ("position", pa.string()), ("cx", pa.int64()), ("cy", pa.int64()), ("size", pa.int64()),
        ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
        ("aesthetic", pa.float64()),
    ])


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), _TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(payload))


def _write_shard(out: Path, shard: int, start: int, count: int, seed: int) -> int:
    """One shard: NNNNN.tar, NNNNN.parquet and NNNNN_stats.json; returns the jpg bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.time()
    rows, nbytes = [], 0
    tar_path = out / f"{shard:05d}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(count):
            key = f"{shard:05d}{i:0{_KEY_SAMPLE_DIGITS}d}"
            jpg, text, meta = _sample(seed, start + i, key)
            _add(tf, f"{key}.jpg", jpg)
            _add(tf, f"{key}.txt", text.encode())
            _add(tf, f"{key}.json", json.dumps(meta).encode())
            rows.append(meta)
            nbytes += len(jpg)
    pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), out / f"{shard:05d}.parquet")
    t1 = time.time()
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "duration": round(t1 - t0, 3), "bytes_downloaded": nbytes, "start_time": t0, "end_time": t1,
             "status_dict": {"success": count}}
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4), encoding="utf-8")
    return nbytes


def write_shards(output_dir: str | Path, num_samples: int, seed: int = 0, samples_per_shard: int = 1000,
                 workers: int = 1) -> ShardSummary:
    """Write `num_samples` training samples as img2dataset webdataset output under `output_dir`.

    Each shard NNNNN has ``NNNNN.tar`` (KEY.jpg quality 95, KEY.txt caption, KEY.json metadata), ``NNNNN.parquet``
    (the metadata rows, no image bytes) and ``NNNNN_stats.json``. Keys are img2dataset's 9 digits: shard id
    (5) then index in the shard (4). Sample i depends only on (seed, i), so the tars and parquet files are
    byte-identical for a seed whatever `workers` is (the stats json records wall time). Held-out pairs never occur.
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1 (got {num_samples})")
    if not 1 <= samples_per_shard <= 10 ** _KEY_SAMPLE_DIGITS:
        raise UserError(f"samples_per_shard must be 1..{10 ** _KEY_SAMPLE_DIGITS} for 9-digit img2dataset keys "
                        f"(got {samples_per_shard})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, s, s * samples_per_shard, min(samples_per_shard, num_samples - s * samples_per_shard), seed)
            for s in range(math.ceil(num_samples / samples_per_shard))]
    t0 = time.time()
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            pool.starmap(_write_shard, jobs)
    else:
        for job in jobs:
            _write_shard(*job)
    return ShardSummary([out / f"{s:05d}.tar" for s in range(len(jobs))], num_samples, time.time() - t0)
