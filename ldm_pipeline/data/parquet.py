"""Parquet shards with an image-bytes column (img2dataset ``jpg`` + ``caption``): one file or row group per shard,
read row group by row group so memory stays flat."""

from __future__ import annotations

from typing import Any

from ldm_pipeline.data.shards import CAPTION_COLUMNS, IMAGE_COLUMNS, RawSample, Shard, _local, _permutation, is_url
from ldm_pipeline.errors import UserError


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
