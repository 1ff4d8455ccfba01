"""webdataset tar shards (img2dataset: KEY.jpg + KEY.txt + KEY.json): local tars are read by random access from
their header index (`tarfile` reads only headers when listing), URLs (s3://, https://, pipe:) are streamed."""

from __future__ import annotations

import json
import math
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ldm_pipeline.data.shards import (
    IMAGE_EXTS,
    RawSample,
    Shard,
    _buffer_shuffled,
    _caption_from,
    _permutation,
    _split_key,
    open_url,
)


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
