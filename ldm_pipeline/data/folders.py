"""Image folders: with a ``metadata.jsonl``/``metadata.csv`` (diffusers imagefolder), cut into byte ranges of the
metadata file (`MetadataFile`, `MetadataShard`); or without one, each image captioned by a same-name file beside it
(kohya-ss/sd-scripts' DreamBooth layout), cut into ranges of the sorted file list (`CaptionFolder`,
`CaptionFolderShard`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldm_pipeline.data.shards import CAPTION_COLUMNS, IMAGE_EXTS, RawSample, Shard, _permutation
from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.errors import UserError

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
