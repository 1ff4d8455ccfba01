"""What every data source format shares: the raw sample, the shard interface, and the helpers the formats use
(URL opening, webdataset key splitting, caption lookup, deterministic shuffles).

A shard yields ``(index, RawSample)`` in a deterministic order: shuffled from a seed string, starting at any index
without reading what comes before it (streamed URLs must read past it, but nothing is decoded). Every sample carries
a JSON-ready ``ref`` (shard id, item) that `Shard.fetch` reads again exactly; the loader's resume state uses both.
The formats are in `tars`, `parquet`, `folders` and `hf`; `sources` picks and opens one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
