"""Picks and opens a data source: the layouts LAION-style data comes in, each cut into shards that yield raw
(undecoded) samples. Each layout's reader is its own module (`tars`, `parquet`, `folders`, `hf`); what they share
(`RawSample`, `Shard`, URL and shuffle helpers) is in `shards`.

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

import glob
import re
from pathlib import Path

from ldm_pipeline.data.folders import CaptionFolder, CaptionFolderShard, MetadataFile, MetadataShard, _has_images
from ldm_pipeline.data.hf import HFStreamShard, _load_hf_stream
from ldm_pipeline.data.parquet import ParquetShard, _parquet_shards, parquet_columns
from ldm_pipeline.data.shards import RawSample, Shard, Want, _local, is_url, open_url
from ldm_pipeline.data.tars import LocalTarShard, StreamTarShard
from ldm_pipeline.errors import UserError

# what other code imports from here (the formats live in the modules above; patch them there, not here)
__all__ = [
    "CaptionFolder",
    "CaptionFolderShard",
    "HFStreamShard",
    "LocalTarShard",
    "MetadataFile",
    "MetadataShard",
    "ParquetShard",
    "RawSample",
    "Shard",
    "StreamTarShard",
    "Want",
    "detect_format",
    "expand_spec",
    "is_url",
    "open_sources",
    "open_url",
    "parquet_columns",
]


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
