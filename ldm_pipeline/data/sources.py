"""Readers for the layouts LAION-style data comes in, each cut into shards that yield raw (undecoded) samples.

* webdataset tars (img2dataset: KEY.jpg + KEY.txt + KEY.json): local tars are read by random access from their
  header index (`tarfile` reads only headers when listing), URLs (s3://, https://, pipe:) are streamed;
* parquet with an image-bytes column (img2dataset ``jpg`` + ``caption``): one file or row group per shard,
  read row group by row group so memory stays flat;
* an image folder with ``metadata.jsonl``/``metadata.csv`` (diffusers imagefolder: ``file_name`` + text column),
  cut into byte ranges of the metadata file: startup reads only its first rows (a CSV is scanned once for record
  boundaries, nothing is parsed or kept), each shard reads its own range when it is iterated;
* an image folder without metadata, each image captioned by a same-name file beside it (kohya-ss/sd-scripts'
  DreamBooth layout: ``NAME.png`` + ``NAME.txt`` or ``NAME.caption``, in subfolders too, ``N_name`` subfolders
  repeated N times per epoch): the file names are listed once at startup and cut into ranges of the sorted list,
  captions are read with their images;
* a Hugging Face dataset by name, streamed (``streaming=True``; needs the optional ``datasets`` package).

A row that cannot be read (malformed JSON, a JSON value that is not an object, a CSV row without ``file_name``) is
a sample skipped as ``bad_metadata``, never the end of its shard; so is a caption file that cannot be read
(``unreadable_caption``).

A shard yields ``(index, RawSample)`` in a deterministic order: shuffled from a seed string, starting at any index
without reading what comes before it (streamed URLs must read past it, but nothing is decoded). Every sample carries
a JSON-ready ``ref`` (shard id, item) that `Shard.fetch` reads again exactly; the loader's resume state uses both.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "txt", "text", "TEXT", "prompt")
# Streams: webdataset's gopen handles pipe:/http(s)/gs/hf (curl, gsutil); fsspec covers s3://, gcs://, az:// etc.
WDS_SCHEMES = ("pipe", "http", "https", "gs", "ais", "hf")

Want = Callable[[int], bool] | None


@dataclass
class RawSample:
    """One sample as stored: nothing decoded yet."""

    key: str  # unique within the dataset (shard name / sample key), seeds the per-sample randomness
    ref: list[Any]  # [shard id, item]: enough to read this sample again with Shard.fetch
    image: bytes | str | None  # encoded image bytes, or a local file path (image folders)
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)  # img2dataset json / parquet row / metadata row
    skip: str | None = None  # a reason to skip it before decoding (e.g. bad_metadata: its row did not parse)


def is_url(spec: str) -> bool:
    """True for ``scheme://…`` and ``pipe:…`` specs other than local ``file://``."""
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def open_url(url: str):
    """A readable binary stream for a URL (webdataset's gopen for pipe:/http/gs, fsspec for the rest)."""
    scheme = url.split(":", 1)[0]
    if scheme in WDS_SCHEMES:
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:  # e.g. s3:// without s3fs: a setup problem, not a bad shard
        raise UserError(f"cannot open {url}: {e}") from None


def _local(spec: str) -> str:
    return spec[len("file://") :] if spec.startswith("file://") else spec


def _split_key(name: str) -> tuple[str | None, str | None]:
    # webdataset's convention: the key is everything before the first dot of the basename
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _caption_from(parts: dict[str, Any], caption_ext: str | None, meta: dict[str, Any]) -> str | None:
    exts = (caption_ext,) if caption_ext else ("txt", "caption", "text")
    for ext in exts:
        value = parts.get(ext)
        if value is not None:
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    value = meta.get("caption")
    return value if isinstance(value, str) else None


def _tar_sample(shard: Shard, key: str, parts: dict[str, bytes], image_ext: str | None, caption_ext: str | None):
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            loaded = json.loads(parts["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:  # the image and caption are still good: keep the sample, without metadata filters
            meta = {}
    exts = (image_ext,) if image_ext else IMAGE_EXTS
    image = next((parts[e] for e in exts if e in parts), None)
    if image is None:  # a payload under an unexpected extension (e.g. .bin): let the decoder judge it
        image = next((v for e, v in parts.items() if e not in ("json", "txt", "caption", "text")), None)
    caption = _caption_from(parts, caption_ext, meta)
    return RawSample(f"{shard.name}/{key}", [shard.shard_id, key], image, caption, meta)


def _buffer_shuffled(stream: Iterator[RawSample], seed: str | None, buffer: int) -> Iterator[RawSample]:
    """A stream shuffled through a buffer of `buffer` samples (webdataset's shuffle), deterministic for a seed."""
    if seed is None or buffer <= 1:
        yield from stream
        return
    rng = random.Random(seed)
    buf: list[RawSample] = []
    for sample in stream:
        if len(buf) < buffer:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _permutation(n: int, seed: str | None) -> list[int]:
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


class Shard:
    """A unit of work: a tar, a parquet file or row group, or an index range. Subclasses implement both methods."""

    shard_id: int
    name: str

    def iterate(self, seed: str | None, start: int, want: Want, stats: DataStats) -> Iterator[tuple[int, RawSample]]:
        """Samples from position `start` of the order `seed` gives (None = stored order), those `want` accepts."""
        raise NotImplementedError

    def fetch(self, items: list[Any]) -> dict[Any, RawSample]:
        """Read the samples whose ref items are `items` (hashable form: lists become tuples)."""
        raise NotImplementedError


class LocalTarShard(Shard):
    """A webdataset tar on local disk: member index from the headers, payloads read by seek."""

    def __init__(self, path: str, shard_id: int, image_ext: str | None, caption_ext: str | None):
        self.path, self.shard_id, self.image_ext, self.caption_ext = path, shard_id, image_ext, caption_ext
        self.name = Path(path).name.split(".")[0]

    def index(self) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]], bool]:
        """(key, {ext: member}) groups in tar order, and whether the file is truncated (its last group dropped)."""
        size = os.path.getsize(self.path)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        truncated = False
        end = 0
        with open(self.path, "rb") as f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
                while True:
                    member = tf.next()
                    if member is None:
                        break
                    if not member.isreg():
                        continue
                    if member.offset_data + member.size > size:
                        truncated = True
                        break
                    end = member.offset_data + math.ceil(member.size / 512) * 512
                    key, ext = _split_key(member.name)
                    if key is None or os.path.basename(key).startswith("__"):
                        continue
                    groups.setdefault(key, {})[ext.lower()] = member
            except (tarfile.TarError, EOFError, OSError):
                truncated = True
        truncated = truncated or size < end + 1024  # a complete tar ends with two zero blocks
        out = list(groups.items())
        if truncated and out:
            out.pop()  # the group the cut went through may be missing members
        return out, truncated

    def _read(self, f, key: str, members: dict[str, tarfile.TarInfo]) -> RawSample:
        parts = {}
        for ext, m in members.items():
            f.seek(m.offset_data)
            parts[ext] = f.read(m.size)
        return _tar_sample(self, key, parts, self.image_ext, self.caption_ext)

    def iterate(self, seed, start, want, stats):
        groups, truncated = self.index()
        order = _permutation(len(groups), seed)
        with open(self.path, "rb") as f:
            for j in range(start, len(groups)):
                if want is None or want(j):
                    key, members = groups[order[j]]
                    yield j, self._read(f, key, members)
        if truncated and (want is None or want(0)):
            stats.note("truncated_shard")

    def fetch(self, items):
        groups = dict(self.index()[0])
        with open(self.path, "rb") as f:
            return {k: self._read(f, k, groups[k]) for k in items if k in groups}


class StreamTarShard(Shard):
    """A webdataset tar behind a URL: read front to back, shuffled through a buffer of `buffer` samples."""

    def __init__(self, url: str, shard_id: int, image_ext: str | None, caption_ext: str | None, buffer: int):
        self.url, self.shard_id, self.image_ext, self.caption_ext = url, shard_id, image_ext, caption_ext
        self.buffer = buffer
        self.name = url.rstrip("/").split("/")[-1].split(".")[0] or f"shard{shard_id}"
        self.truncated = False

    def _stream(self) -> Iterator[RawSample]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        self.truncated = False
        stream = open_url(self.url)
        try:
            files = ({**f, "__url__": self.url} for f in tar_file_iterator(stream))
            for parts in group_by_keys(files):
                key = parts.pop("__key__")
                parts = {k: v for k, v in parts.items() if not k.startswith("__")}
                yield _tar_sample(self, key, parts, self.image_ext, self.caption_ext)
        except (tarfile.TarError, EOFError, OSError, ValueError):
            self.truncated = True  # stop this shard, keep what was read
        finally:
            stream.close()

    def iterate(self, seed, start, want, stats):
        for j, sample in enumerate(_buffer_shuffled(self._stream(), seed, self.buffer)):
            if j >= start and (want is None or want(j)):
                yield j, sample
        if self.truncated and (want is None or want(0)):
            stats.note("truncated_shard")

    def fetch(self, items):
        wanted = set(items)
        return {s.ref[1]: s for s in self._stream() if s.ref[1] in wanted}


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    if is_url(path):
        import fsspec

        try:
            return pq.ParquetFile(fsspec.open(path, "rb").open())  # parquet needs seeks: fsspec, never a pipe
        except ImportError as e:
            raise UserError(f"cannot open {path}: {e}") from None
    return pq.ParquetFile(_local(path))


def parquet_columns(schema, image_column: str | None, caption_column: str | None, where: str) -> tuple[str, str]:
    """The image and caption column names of a parquet schema (given, or the usual img2dataset/HF names)."""
    names = list(schema.names)
    image = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    caption = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    if image is None or image not in names:
        raise UserError(f"{where}: no image column {image_column or ''} (columns: {', '.join(names)}); "
                        "set data.image_column")
    if caption is None or caption not in names:
        raise UserError(f"{where}: no caption column {caption_column or ''} (columns: {', '.join(names)}); "
                        "set data.caption_column")
    return image, caption


class ParquetShard(Shard):
    """A parquet file (or some of its row groups); rows read one row group at a time."""

    def __init__(self, path: str, shard_id: int, row_groups: list[int] | None, image_col: str | None,
                 caption_col: str | None):
        self.path, self.shard_id, self.row_groups = path, shard_id, row_groups
        self.image_col, self.caption_col = image_col, caption_col
        self.stem = path.rstrip("/").split("/")[-1].split(".")[0]  # keys use the file only: same with any split
        self.name = self.stem if row_groups is None or len(row_groups) != 1 else f"{self.stem}.rg{row_groups[0]}"

    def _rows(self, pf, rg: int) -> list[dict[str, Any]]:
        import pyarrow as pa

        image, caption = parquet_columns(pf.schema_arrow, self.image_col, self.caption_col, self.path)
        # skip other binary columns (extra image columns would double the memory for nothing)
        cols = [f.name for f in pf.schema_arrow if f.name in (image, caption)
                or not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
        table = pf.read_row_group(rg, columns=cols)
        data = table.to_pydict()
        n = table.num_rows
        rows = []
        for r in range(n):
            meta = {c: data[c][r] for c in cols if c not in (image, caption)}
            img = data[image][r]
            if isinstance(img, dict):  # HF Image feature stored as {bytes, path}
                img = img.get("bytes")
            cap = data[caption][r]
            rows.append({"image": img, "caption": cap if isinstance(cap, str) else None, "meta": meta})
        return rows

    def _sample(self, rg: int, row: int, r: dict[str, Any]) -> RawSample:
        key = r["meta"].get("key")
        key = key if isinstance(key, str) and key else f"{rg}.{row}"
        return RawSample(f"{self.stem}/{key}", [self.shard_id, [rg, row]], r["image"], r["caption"], r["meta"])

    def iterate(self, seed, start, want, stats):
        pf = _parquet_file(self.path)
        groups = self.row_groups if self.row_groups is not None else list(range(pf.num_row_groups))
        order = _permutation(len(groups), seed)
        base = 0
        for gi in order:
            rg = groups[gi]
            n = pf.metadata.row_group(rg).num_rows
            if base + n <= start or (want is not None and not any(want(j) for j in range(max(base, start), base + n))):
                base += n  # nothing wanted here: the row group is not read at all
                continue
            rows = self._rows(pf, rg)
            perm = _permutation(n, None if seed is None else f"{seed}:rg{rg}")
            for i in range(max(0, start - base), n):
                if want is None or want(base + i):
                    yield base + i, self._sample(rg, perm[i], rows[perm[i]])
            base += n

    def fetch(self, items):
        pf = _parquet_file(self.path)
        out = {}
        for rg in sorted({tuple(i)[0] for i in items}):
            rows = self._rows(pf, rg)
            for item in items:
                if tuple(item)[0] == rg:
                    out[tuple(item)] = self._sample(rg, item[1], rows[item[1]])
        return out


# metadata byte ranges per shard: at least MIN (small files give one shard, split by sample between readers), at
# most MAX (what one shard holds in memory while it is read)
METADATA_CHUNK_BYTES = (64 * 1024, 1024 * 1024)


class MetadataFile:
    """diffusers imagefolder metadata (``file_name`` + caption column), read by byte ranges, never as a whole.

    A record belongs to the range its first byte falls in. JSON Lines records are lines, so a range finds its first
    record by skipping to the next newline; CSV records may span lines inside quotes, so the CSV is scanned once at
    startup (quote parity, no parsing) for record-aligned range starts.
    """

    def __init__(self, root: Path, path: Path, caption_column: str | None):
        self.root, self.path, self.is_csv = root, path, path.suffix == ".csv"
        self.size = path.stat().st_size
        self.header: list[str] = []
        self.data_start = 0
        with open(path, "rb") as f:
            if self.is_csv:
                head = self._read_record(f)
                self.header = next(csv.reader(io.StringIO(head.decode("utf-8-sig", errors="replace"))), [])
                self.data_start = f.tell()
                columns = self.header
            else:
                columns = self._first_row_columns(f)
        if "file_name" not in columns:
            raise UserError(f"{path}: needs a file_name column (diffusers imagefolder layout)")
        self.caption_column = caption_column or next((c for c in ("text", *CAPTION_COLUMNS) if c in columns), None)
        if self.caption_column not in columns:
            raise UserError(f"{path}: no caption column {caption_column or ''} (columns: {', '.join(columns)}); "
                            "set data.caption_column")

    def _first_row_columns(self, f) -> list[str]:
        """Columns of the first JSON object row (bad rows before it are skipped at training time)."""
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                return list(row)
        raise UserError(f"{self.path}: no readable row (each line must be a JSON object with file_name and a caption)")

    @staticmethod
    def _read_record(f) -> bytes:
        """One CSV record from the current position: lines until the double quotes balance."""
        buf = b""
        while True:
            line = f.readline()
            buf += line
            if not line or buf.count(b'"') % 2 == 0:
                return buf

    def ranges(self, min_shards: int) -> list[tuple[int, int]]:
        """Byte ranges [start, stop) covering the records, about size / min_shards each (within the chunk bounds)."""
        lo, hi = METADATA_CHUNK_BYTES
        body = self.size - self.data_start
        chunk = min(hi, max(lo, math.ceil(body / max(1, min_shards))))
        if not self.is_csv:
            return [(s, min(s + chunk, self.size)) for s in range(0, max(body, 1), chunk)]
        starts, any_record = [self.data_start], False
        with open(self.path, "rb") as f:
            f.seek(self.data_start)
            pos = self.data_start
            while True:
                record = self._read_record(f)
                if not record:
                    break
                any_record = any_record or bool(record.strip())
                pos += len(record)
                if pos - starts[-1] >= chunk and pos < self.size:
                    starts.append(pos)
        if not any_record:
            raise UserError(f"{self.path}: no rows after the header")
        return list(zip(starts, [*starts[1:], self.size]))

    def records(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        """(offset, raw record) of every non-blank record whose first byte is in [start, stop)."""
        out = []
        with open(self.path, "rb") as f:
            if self.is_csv or start == 0:
                f.seek(start)
            else:  # the first line starting at or after `start`
                f.seek(start - 1)
                f.readline()
            pos = f.tell()
            while pos < stop:
                record = self._read_record(f) if self.is_csv else f.readline()
                if not record:
                    break
                if record.strip():
                    out.append((pos, record))
                pos += len(record)
        return out

    def read_at(self, offset: int) -> bytes:
        """The record starting at byte `offset` (a ref saved with a checkpoint)."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return self._read_record(f) if self.is_csv else f.readline()

    def _row(self, record: bytes) -> dict[str, Any] | None:
        try:
            if self.is_csv:
                values = next(csv.reader(io.StringIO(record.decode("utf-8", errors="replace"))), [])
                if len(values) > len(self.header):
                    return None
                return dict(zip(self.header, [*values, *[None] * (len(self.header) - len(values))]))
            row = json.loads(record)
        except (ValueError, csv.Error):
            return None
        return row if isinstance(row, dict) else None

    def sample(self, shard_id: int, offset: int, record: bytes) -> RawSample:
        row = self._row(record)
        name = row.get("file_name") if row is not None else None
        if not isinstance(name, str) or not name:
            return RawSample(f"{self.path.name}@{offset}", [shard_id, offset], None, None, skip="bad_metadata")
        caption = row.get(self.caption_column)
        meta = {k: v for k, v in row.items() if k not in ("file_name", self.caption_column)}
        return RawSample(name, [shard_id, offset], str(self.root / name), caption if isinstance(caption, str) else None,
                         meta)


class MetadataShard(Shard):
    """One byte range of an image folder's metadata file; its records are read (not parsed) when iterated."""

    def __init__(self, table: MetadataFile, shard_id: int, start: int, stop: int):
        self.table, self.shard_id, self.start, self.stop = table, shard_id, start, stop
        self.name = f"{table.path.name}@{start}"

    def iterate(self, seed, start, want, stats):
        records = self.table.records(self.start, self.stop)
        order = _permutation(len(records), seed)
        for j in range(start, len(records)):
            if want is None or want(j):
                offset, record = records[order[j]]
                yield j, self.table.sample(self.shard_id, offset, record)

    def fetch(self, items):
        return {o: self.table.sample(self.shard_id, o, self.table.read_at(o)) for o in items}


# caption files beside the images, in the order tried (kohya's caption_extension: .caption by default, .txt in the
# GUI and most guides)
CAPTION_EXTS = ("txt", "caption")
# a subfolder of the data folder named N_name (kohya's DreamBooth layout): its images count N times per epoch, and
# "name" (kohya's class tokens) captions those without a caption file
REPEAT_FOLDER = re.compile(r"(\d+)_(.*)")
# images per caption-folder shard: at least MIN (small folders give one shard, split by sample between readers), at
# most MAX (one shard's list of samples, expanded by repeats and shuffled when it is read)
CAPTION_FOLDER_CHUNK = (256, 8192)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # .DS_Store, .git, macOS zip debris (__MACOSX/._x.jpg)


def _is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS and not _hidden(name)


def _walk_images(root: Path, caption_exts: tuple[str, ...]) -> Iterator[tuple[str, bool]]:
    """(path relative to `root` in POSIX form, whether a caption file is beside it) of every image under `root`,
    hidden files and folders left out, in no particular order. Symlinked folders are followed, each real folder once
    (a link cycle ends)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        rel = Path(dirpath).relative_to(root)
        names = set(filenames)
        for name in filenames:
            if _is_image_name(name):
                stem = name.rsplit(".", 1)[0]
                yield (rel / name).as_posix(), any(f"{stem}.{ext}" in names for ext in caption_exts)


def _has_images(root: Path) -> bool:
    return next(_walk_images(root, ()), None) is not None


def _caption_text(data: bytes) -> tuple[str, bool]:
    """(text, whether it was valid UTF-8) of a caption file; a UTF-8 BOM is dropped, UTF-16 (with its BOM) read."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows Notepad's "Unicode"
        return data.decode("utf-16", errors="replace"), True
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="replace"), False


class CaptionFolder:
    """Images with same-name caption files beside them (kohya-ss/sd-scripts' DreamBooth layout), found recursively.

    Startup lists the folder once and keeps the sorted relative paths (the sample order does not depend on the file
    system's); captions are read with their images. Kohya's rules: the caption is the first line of ``NAME.txt``
    (else ``NAME.caption``) without surrounding whitespace; a subfolder ``N_name`` directly inside the root counts
    its images N times per epoch (``0_name``: not used) and "name" is the caption of those whose caption file is
    missing or empty. Other images without a caption are ``no_caption`` samples, like the metadata folder's.
    """

    def __init__(self, root: Path, caption_ext: str | None):
        self.root = root
        self.caption_exts = (caption_ext.lstrip("."),) if caption_ext else CAPTION_EXTS
        listed = sorted(_walk_images(root, self.caption_exts))
        if not listed:
            raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in it or its subfolders; give the folder "
                            "holding NAME.png + NAME.txt pairs")
        self.repeats: dict[str, int] = {}  # top-level subfolder -> N, for N_name folders
        self.class_tokens: dict[str, str] = {}
        for top in sorted({rel.split("/", 1)[0] for rel, _ in listed if "/" in rel}):
            m = REPEAT_FOLDER.fullmatch(top)
            if m:
                self.repeats[top], self.class_tokens[top] = int(m[1]), m[2].strip()
        kept = [(rel, captioned) for rel, captioned in listed if self.repeat(rel) > 0]
        if not kept:
            raise UserError(f"{root}: every image is in a 0_name folder (0 repeats); rename the folders N_name with "
                            "N >= 1")
        self.paths = [rel for rel, _ in kept]
        self._log_startup(len(listed), [rel for rel, captioned in kept if not captioned and not self._tokens(rel)])

    def _log_startup(self, found: int, uncaptioned: list[str]) -> None:
        import logging

        log = logging.getLogger("ldm_pipeline.data")
        if self.repeats:
            counts = Counter(self._top(rel) for rel in self.paths)
            log.info("%s: images per epoch from N_name folders: %s", self.root,
                     ", ".join(f"{top} {counts[top]} x {n}" for top, n in self.repeats.items() if n))
            for top, n in self.repeats.items():
                if n >= 1000:  # a year or date (2023_trip) read as a repeat count
                    log.warning("%s/%s: %d repeats per epoch (kohya's N_name prefix); rename the folder if that is "
                                "not a repeat count", self.root, top, n)
        if uncaptioned:  # all of them: plain images, e.g. for train-vae (text-to-image training stops: no_caption)
            level = logging.WARNING if len(uncaptioned) < len(self.paths) else logging.INFO
            log.log(level, "%s: %d of %d images have no caption file (%s beside NAME.png, e.g. %s): they are "
                    "skipped as no_caption unless data.allow_empty_captions is set", self.root, len(uncaptioned),
                    len(self.paths), " or ".join(f"NAME.{e}" for e in self.caption_exts), uncaptioned[0])
        if found > len(self.paths):
            log.info("%s: %d images in 0_name folders are not used", self.root, found - len(self.paths))

    @staticmethod
    def _top(rel: str) -> str | None:
        return rel.split("/", 1)[0] if "/" in rel else None

    def repeat(self, rel: str) -> int:
        """How many times the image at `rel` counts per epoch."""
        return self.repeats.get(self._top(rel), 1)

    def _tokens(self, rel: str) -> str:
        return self.class_tokens.get(self._top(rel), "")

    def ranges(self, min_shards: int) -> list[tuple[int, int]]:
        """Index ranges [start, stop) of the sorted paths, about len / min_shards each (within the chunk bounds)."""
        lo, hi = CAPTION_FOLDER_CHUNK
        n = len(self.paths)
        chunk = min(hi, max(lo, math.ceil(n / max(1, min_shards))))
        return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    def read_caption(self, rel: str, stats: DataStats | None = None) -> tuple[str | None, str | None]:
        """(caption, skip reason) of the image at `rel`: the first caption file's first line, else class tokens."""
        stem = str(self.root / rel).rsplit(".", 1)[0]
        caption = ""
        for ext in self.caption_exts:
            try:
                data = Path(f"{stem}.{ext}").read_bytes()
            except FileNotFoundError:
                continue
            except OSError:  # permissions, a folder by that name: this sample only
                return None, "unreadable_caption"
            text, valid = _caption_text(data)
            if not valid and stats is not None:
                stats.note("caption_not_utf8")
            caption = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0].strip()  # kohya reads the first line only
            break
        return caption or self._tokens(rel) or None, None

    def sample(self, shard_id: int, rel: str, copy: int, stats: DataStats | None = None) -> RawSample:
        """Repeat `copy` of the image at `rel`; copies have their own keys, so their own crops, flips and dropout."""
        caption, skip = self.read_caption(rel, stats)
        key = rel if copy == 0 else f"{rel}#{copy}"
        return RawSample(key, [shard_id, [rel, copy]], str(self.root / rel), caption, {}, skip)


class CaptionFolderShard(Shard):
    """A range of a caption folder's sorted images, each image as many times as its folder repeats it."""

    def __init__(self, folder: CaptionFolder, shard_id: int, start: int, stop: int):
        self.folder, self.shard_id, self.start, self.stop = folder, shard_id, start, stop
        self.name = f"{folder.root.name}[{start}:{stop}]"

    def entries(self) -> list[tuple[int, int]]:
        """(path index, copy) in stored order: every image once, then the second copies, and so on."""
        counts = [self.folder.repeat(self.folder.paths[i]) for i in range(self.start, self.stop)]
        return [(self.start + k, copy) for copy in range(max(counts, default=0))
                for k, n in enumerate(counts) if copy < n]

    def iterate(self, seed, start, want, stats):
        entries = self.entries()
        order = _permutation(len(entries), seed)
        for j in range(start, len(entries)):
            if want is None or want(j):
                i, copy = entries[order[j]]
                yield j, self.folder.sample(self.shard_id, self.folder.paths[i], copy, stats)

    def fetch(self, items):
        return {(rel, copy): self.folder.sample(self.shard_id, rel, copy) for rel, copy in items}


def _load_hf_stream(name: str, split: str, image_column: str | None, caption_column: str | None):
    """(streaming dataset, image column, caption column), images kept encoded (decode=False) until used."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"'{name}' is no local file or folder; reading it as a Hugging Face dataset needs the "
                        "datasets package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        names = list(ds.column_names or [])
        if not names:  # features unknown until the first row (e.g. plain JSON files)
            names = list(next(iter(ds)))
    except Exception as e:  # offline, unknown name, bad split: all one line for the user
        raise UserError(f"cannot load Hugging Face dataset '{name}' (split {split}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    image = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    caption = caption_column or next((c for c in ("text", *CAPTION_COLUMNS) if c in names), None)
    if image not in names or caption not in names:
        raise UserError(f"dataset '{name}': image/caption columns not found (columns: {', '.join(names)}); "
                        "set data.image_column and data.caption_column")
    features = ds.features or {}
    if isinstance(features.get(image), datasets.Image):
        ds = ds.cast_column(image, datasets.Image(decode=False))
    return ds, image, caption


class HFStreamShard(Shard):
    """One of a streaming Hugging Face dataset's shards (its data files), read front to back through a shuffle
    buffer like a streamed tar; a sample's ref is its index in the shard's stream."""

    def __init__(self, ds, shard_id: int, num_shards: int, image_column: str, caption_column: str, buffer: int):
        self.ds = ds.shard(num_shards=num_shards, index=shard_id) if num_shards > 1 else ds
        self.shard_id, self.image_column, self.caption_column, self.buffer = shard_id, image_column, caption_column, buffer
        self.name = f"hf{shard_id}"

    def _stream(self) -> Iterator[RawSample]:
        for i, row in enumerate(self.ds):
            image = row.get(self.image_column)
            if isinstance(image, dict):
                image = image.get("bytes") or image.get("path")
            elif image is not None and not isinstance(image, (bytes, str)):  # already a PIL image
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                image = buf.getvalue()
            caption = row.get(self.caption_column)
            meta = {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column)
                    and isinstance(v, (str, int, float, bool, type(None)))}
            yield RawSample(f"{self.name}/{i}", [self.shard_id, i], image, caption if isinstance(caption, str) else None,
                            meta)

    def iterate(self, seed, start, want, stats):
        for j, sample in enumerate(_buffer_shuffled(self._stream(), seed, self.buffer)):
            if j >= start and (want is None or want(j)):
                yield j, sample

    def fetch(self, items):
        wanted = set(items)
        return {s.ref[1]: s for s in self._stream() if s.ref[1] in wanted}


def expand_spec(spec: str) -> list[str]:
    """Brace ranges and globs → sorted file list (URL globs through fsspec); a directory or plain path stays."""
    from braceexpand import braceexpand

    if is_url(spec):
        out = []
        for part in braceexpand(spec):
            if any(c in part for c in "*?[") and not part.startswith("pipe:"):
                import fsspec

                fs, path = fsspec.core.url_to_fs(part)
                out.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(path)))
            else:
                out.append(part)
        return out
    spec = _local(spec)
    if Path(spec).exists():
        return [spec]
    out: list[str] = []
    for part in braceexpand(spec):
        if any(c in part for c in "*?["):
            out.extend(sorted(glob.glob(part, recursive=True)))
        elif Path(part).exists():
            out.append(part)
    return out


def _find_metadata(root: Path) -> Path | None:
    for d in (root, root / "train"):
        for name in ("metadata.jsonl", "metadata.csv"):
            if (d / name).is_file():
                return d / name
    return None


def detect_format(spec: str, files: list[str]) -> str:
    """webdataset / parquet / imagefolder / hf from what the spec names."""
    if len(files) == 1 and Path(files[0]).is_dir():
        root = Path(files[0])
        if _find_metadata(root):
            return "imagefolder"
        if any(root.glob("*.tar")):
            return "webdataset"  # img2dataset webdataset output also has metadata-only parquet files beside
        if any(root.glob("*.parquet")):
            return "parquet"
        if _has_images(root):
            return "imagefolder"  # captions in NAME.txt files beside the images (kohya)
        raise UserError(f"{spec}: no *.tar, *.parquet, metadata.jsonl/metadata.csv or images (NAME.png + NAME.txt) "
                        "found in it; give the folder holding the data, or set data.format")
    if not files:
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith("."):
            return "hf"
        raise UserError(f"data source '{spec}' matches no files: give a directory, glob, brace range "
                        "(shards/{00000..00099}.tar), URL or Hugging Face dataset name")
    names = [f.split("?")[0] for f in files]
    if all(re.search(r"\.(tar|tgz|tar\.gz)$", n) for n in names):
        return "webdataset"
    if all(n.endswith(".parquet") for n in names):
        return "parquet"
    raise UserError(f"data source '{spec}': cannot tell the format from {files[0]}; set data.format")


def open_sources(spec: str, format: str = "auto", image_column: str | None = None, caption_column: str | None = None,
                 min_shards: int = 1, shuffle_buffer: int = 1000, hf_split: str = "train") -> list[Shard]:
    """The shards of a data source. Lists files but opens no tar; parquet footers are read only when there are
    fewer files than `min_shards` (then row groups become shards); image-folder metadata is cut into byte ranges
    (`MetadataFile`), an image folder without metadata into ranges of its listed images (`CaptionFolder`); a Hugging
    Face dataset is streamed, one shard per data file.
    """
    if not spec:
        raise UserError("no training data given: set data.source (directory, glob, brace range, URL or HF name)")
    files = [] if format == "hf" else expand_spec(spec)
    fmt = detect_format(spec, files) if format == "auto" else format
    if fmt in ("webdataset", "parquet") and len(files) == 1 and Path(files[0]).is_dir():
        ext = "*.tar" if fmt == "webdataset" else "*.parquet"
        files = sorted(str(p) for p in Path(files[0]).glob(ext))
    if fmt in ("webdataset", "parquet") and not files:
        raise UserError(f"data source '{spec}' matches no {fmt} files")
    if fmt == "webdataset":
        return [LocalTarShard(_local(f), i, image_column, caption_column)
                if not is_url(f) and f.endswith(".tar") else
                StreamTarShard(f, i, image_column, caption_column, shuffle_buffer) for i, f in enumerate(files)]
    if fmt == "parquet":
        return _parquet_shards(files, image_column, caption_column, min_shards)
    if fmt == "imagefolder":
        root = Path(files[0]) if files else Path(spec)
        if not root.is_dir():
            raise UserError(f"{spec}: an image folder source must be a directory")
        metadata = _find_metadata(root)
        if metadata is None:  # no metadata file: captions in files beside the images
            folder = CaptionFolder(root, caption_column)
            return [CaptionFolderShard(folder, i, a, b) for i, (a, b) in enumerate(folder.ranges(min_shards))]
        table = MetadataFile(metadata.parent, metadata, caption_column)
        return [MetadataShard(table, i, a, b) for i, (a, b) in enumerate(table.ranges(min_shards))]
    if fmt == "hf":
        ds, image, caption = _load_hf_stream(spec[3:] if spec.startswith("hf:") else spec, hf_split, image_column,
                                             caption_column)
        n = max(1, int(getattr(ds, "n_shards", 1) or 1))
        return [HFStreamShard(ds, i, n, image, caption, shuffle_buffer) for i in range(n)]
    raise UserError(f"unknown data format '{fmt}' (auto, webdataset, parquet, imagefolder, hf)")


def _parquet_shards(files: list[str], image_column: str | None, caption_column: str | None,
                    min_shards: int) -> list[Shard]:
    """One shard per file, or per row group when there are fewer files than readers. Files whose footer cannot be
    read stay whole-file shards (skipped and counted as unreadable_shard when read); only when none is readable
    is it an error."""
    import logging

    footers: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def footer(f: str):
        if f not in footers and f not in errors:
            try:
                footers[f] = _parquet_file(f)
            except UserError:
                raise
            except Exception as e:  # not parquet, truncated, permission: this file only
                errors[f] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return footers.get(f)

    first = next((f for f in files if footer(f) is not None), None)
    if first is None:
        raise UserError(f"no readable parquet file among {len(files)} ({files[0]}: {errors[files[0]]})")
    parquet_columns(footers[first].schema_arrow, image_column, caption_column, first)
    log = logging.getLogger("ldm_pipeline.data")
    for f, e in errors.items():
        log.warning("parquet file %s is unreadable (%s): its samples will be skipped", f, e)
    if len(files) >= min_shards:
        return [ParquetShard(f, i, None, image_column, caption_column) for i, f in enumerate(files)]
    shards: list[Shard] = []
    for f in files:
        pf = footer(f)
        groups = [None] if pf is None else [[rg] for rg in range(pf.num_row_groups)]
        for rg in groups:
            shards.append(ParquetShard(f, len(shards), rg, image_column, caption_column))
    return shards
