"""Metadata filters (LAION columns): a sample is dropped before its image is decoded.

A sample lacking a field, or holding null/NaN in it, passes that filter: partial metadata should not empty a dataset.
"""

from __future__ import annotations

import math
from typing import Any

from ldm_pipeline.data.config import FilterConfig

# aesthetic score goes by several names: LAION-aesthetics parquet, img2dataset extra columns, hand-made json
AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")


def _number(meta: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = meta.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isnan(number):
            return number
    return None


def filter_reason(meta: dict[str, Any], filters: FilterConfig) -> str | None:
    """The DataStats skip reason if `meta` fails a filter, else None."""
    checks = (
        ("small_original", ("original_width",), filters.min_original_width, 1),
        ("small_original", ("original_height",), filters.min_original_height, 1),
        ("punsafe", ("punsafe",), filters.max_punsafe, -1),
        ("pwatermark", ("pwatermark",), filters.max_pwatermark, -1),
        ("low_aesthetic", AESTHETIC_KEYS, filters.min_aesthetic, 1),
        ("low_similarity", ("similarity",), filters.min_similarity, 1),
    )
    for reason, keys, limit, sign in checks:
        if limit is None:
            continue
        value = _number(meta, *keys)
        if value is not None and (value < limit if sign > 0 else value > limit):
            return reason
    return None
