"""A Hugging Face dataset by name, streamed (``streaming=True``; needs the optional ``datasets`` package)."""

from __future__ import annotations

import io
from collections.abc import Iterator

from ldm_pipeline.data.shards import CAPTION_COLUMNS, IMAGE_COLUMNS, RawSample, Shard, _buffer_shuffled
from ldm_pipeline.errors import UserError


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
