"""Write tiny datasets in the layouts `sources` reads, including the broken samples real scrapes contain.

For tests (ours and the training loop's): img2dataset webdataset shards (NNNNN.tar with KEY.jpg/txt/json, plus
NNNNN.parquet and NNNNN_stats.json), img2dataset parquet output (``jpg`` + ``caption`` columns), and a diffusers
image folder (``metadata.jsonl``/``metadata.csv``). Odd samples, by name in `ODD_KINDS`:

corrupt (JPEG with a broken scan), truncated (half a JPEG), not_image (HTML under .jpg), no_caption, empty_caption,
no_image (caption and json only), cmyk, gray, rgba, palette, 16bit (PNG I;16), exif_rotated (orientation 6, stored
sideways), tiny (8x8), bomb (1200x1200: a decompression bomb once ``max_image_pixels`` < 1,440,000).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ODD_KINDS = ("corrupt", "truncated", "not_image", "no_caption", "empty_caption", "no_image", "cmyk", "gray", "rgba",
             "palette", "16bit", "exif_rotated", "tiny", "bomb")
# kinds the loader repairs (the sample is used); the others are skipped with a reason
FIXABLE_KINDS = ("cmyk", "gray", "rgba", "palette", "16bit", "exif_rotated", "tiny", "bomb")


def fixture_image(i: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A distinct RGB picture for sample `i`: a colour gradient plus seeded noise."""
    w, h = size
    rng = np.random.default_rng([seed, i])
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, (i * 37) % 256)], -1)
    noise = rng.integers(-30, 30, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _payload(kind: str | None, i: int, size: tuple[int, int], seed: int) -> tuple[str, bytes | None, str | None]:
    """(extension, image bytes, caption) of one sample of the given odd kind (None = a normal sample)."""
    img = fixture_image(i, size, seed)
    caption: str | None = f"sample {i}, tag{i % 3}, color{i % 5}, shape{i % 7}"
    jpg = _encode(img, "JPEG", quality=90)
    if kind is None:
        return "jpg", jpg, caption
    if kind == "corrupt":  # a stray SOF marker inside the scan data: libjpeg gives up on it
        sos = jpg.find(b"\xff\xda")
        body = sos + 2 + int.from_bytes(jpg[sos + 2 : sos + 4], "big")
        return "jpg", jpg[:body] + b"\x00" * 10 + b"\xff\xc0" + jpg[body + 12 :], caption
    if kind == "truncated":
        return "jpg", jpg[: len(jpg) // 2], caption
    if kind == "not_image":
        return "jpg", b"<html><body>404 not found</body></html>", caption
    if kind == "no_caption":
        return "jpg", jpg, None
    if kind == "empty_caption":
        return "jpg", jpg, "  "
    if kind == "no_image":
        return "jpg", None, caption
    if kind == "cmyk":
        return "jpg", _encode(img.convert("CMYK"), "JPEG"), caption
    if kind == "gray":
        return "jpg", _encode(img.convert("L"), "JPEG"), caption
    if kind == "rgba":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))))
        return "png", _encode(rgba, "PNG"), caption
    if kind == "palette":
        return "png", _encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"), caption
    if kind == "16bit":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        return "png", _encode(Image.fromarray(arr), "PNG"), caption
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° clockwise to display
        return "jpg", _encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes()), caption
    if kind == "tiny":
        return "jpg", _encode(fixture_image(i, (8, 8), seed), "JPEG"), caption
    if kind == "bomb":
        return "png", _encode(Image.new("L", (1200, 1200), 128), "PNG"), caption
    raise ValueError(f"unknown odd sample kind {kind!r} (one of {', '.join(ODD_KINDS)})")


def _meta(i: int, key: str, caption: str | None, size: tuple[int, int], data: bytes | None) -> dict[str, Any]:
    """img2dataset's json fields plus the LAION extra columns, varied by index so filters have work."""
    return {
        "url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
        "error_message": None, "width": size[0], "height": size[1],
        "original_width": size[0] * (1 + i % 3), "original_height": size[1] * (1 + i % 3), "exif": "{}",
        "sha256": hashlib.sha256(data or b"").hexdigest(), "similarity": round(0.2 + 0.05 * (i % 4), 3),
        "punsafe": round((i % 10) / 10, 2), "pwatermark": round((i % 5) / 5, 2),
        "AESTHETIC_SCORE": 4.0 + (i % 4) * 0.5,
    }


def _plan(n: int, odd: Sequence[str]) -> list[str | None]:
    """n normal samples with the odd ones spread among them."""
    kinds: list[str | None] = [None] * n
    for k, kind in enumerate(odd):
        kinds.insert(min(len(kinds), (k * 3 + 1)), kind)
    return kinds


def write_laion_fixture(out_dir: str | Path, n: int = 16, shards: int = 2, odd: Sequence[str] = (),
                        sizes: Sequence[tuple[int, int]] = ((64, 48),), seed: int = 0, truncate_tar: bool = False,
                        meta: Callable[[int], dict[str, Any]] | None = None) -> list[Path]:
    """img2dataset webdataset output: `shards` tars of n normal + len(odd) odd samples; returns the tar paths.

    Sample i goes to shard i % shards with key ``{shard:05d}{i:04d}``; `sizes` cycles image sizes; `meta(i)` adds
    json fields. With `truncate_tar` the last tar is cut short mid-file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
    tars = [tarfile.open(out / f"{s:05d}.tar", "w") for s in range(shards)]
    for i, kind in enumerate(_plan(n, odd)):
        s = i % shards
        key = f"{s:05d}{i:04d}"
        size = sizes[i % len(sizes)]
        ext, data, caption = _payload(kind, i, size, seed)
        info = {**_meta(i, key, caption, size, data), **(meta(i) if meta else {})}
        members = [("json", json.dumps(info).encode())]
        if data is not None:
            members.insert(0, (ext, data))
        if caption is not None:
            members.insert(1, ("txt", caption.encode()))
        for member_ext, payload in members:
            ti = tarfile.TarInfo(f"{key}.{member_ext}")
            ti.size = len(payload)
            tars[s].addfile(ti, io.BytesIO(payload))
        rows[s].append(info)
    paths = []
    for s, tf in enumerate(tars):
        tf.close()
        paths.append(out / f"{s:05d}.tar")
        if rows[s]:
            pq.write_table(pa.Table.from_pylist(rows[s]), out / f"{s:05d}.parquet")
        stats = {"count": len(rows[s]), "successes": len(rows[s]), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(rows[s])}}
        (out / f"{s:05d}_stats.json").write_text(json.dumps(stats), encoding="utf-8")
    if truncate_tar:
        data = paths[-1].read_bytes()
        paths[-1].write_bytes(data[: int(len(data) * 0.6)])
    return paths


def write_parquet_fixture(out_dir: str | Path, n: int = 16, files: int = 1, odd: Sequence[str] = (),
                          row_group_size: int = 4, image_column: str = "jpg", caption_column: str = "caption",
                          sizes: Sequence[tuple[int, int]] = ((64, 48),), seed: int = 0) -> list[Path]:
    """img2dataset parquet output (image bytes in `image_column`, caption in `caption_column`); returns the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(files)]
    for i, kind in enumerate(_plan(n, odd)):
        f = i % files
        key = f"{f:05d}{i:04d}"
        size = sizes[i % len(sizes)]
        _, data, caption = _payload(kind, i, size, seed)
        info = _meta(i, key, caption, size, data)
        info.pop("caption")
        rows[f].append({"key": key, caption_column: caption, image_column: data,
                        **{k: v for k, v in info.items() if k != "key"}})
    paths = []
    for f, file_rows in enumerate(rows):
        schema = pa.Table.from_pylist(file_rows).schema
        schema = schema.set(schema.get_field_index(image_column), pa.field(image_column, pa.binary()))
        schema = schema.set(schema.get_field_index(caption_column), pa.field(caption_column, pa.string()))
        path = out / f"{f:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(file_rows, schema=schema), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_imagefolder_fixture(out_dir: str | Path, n: int = 16, odd: Sequence[str] = (), metadata: str = "jsonl",
                              caption_column: str = "text", sizes: Sequence[tuple[int, int]] = ((64, 48),),
                              seed: int = 0) -> Path:
    """A diffusers image folder: images plus metadata.jsonl or metadata.csv (file_name + caption column)."""
    import csv

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, kind in enumerate(_plan(n, odd)):
        size = sizes[i % len(sizes)]
        ext, data, caption = _payload(kind, i, size, seed)
        name = f"images/{i:05d}.{ext}"
        if data is not None:
            (out / name).write_bytes(data)
        rows.append({"file_name": name, caption_column: caption if caption is not None else "",
                     "punsafe": round((i % 10) / 10, 2)})
    if metadata == "jsonl":
        lines = [json.dumps({k: (v if v != "" or k != caption_column else None) for k, v in r.items()}) for r in rows]
        (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return out
