"""Aspect-ratio buckets (kohya style): sizes of about resolution² pixels whose sides are multiples of a step.

Training on the bucket closest to an image's aspect ratio keeps whole subjects in frame instead of center-cropping
every picture square; a batch always comes from one bucket so its tensors stack.
"""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """All (width, height) with sides multiples of `step` in [min_side, max_side] and area ≤ resolution²,
    each width paired with the largest height that fits (kohya-ss ``make_bucket_resolutions``)."""
    min_side = min_side or max(step, resolution // 2)
    max_side = max_side or resolution * 2
    max_area = resolution * resolution
    square = resolution // step * step
    buckets = {(square, square)}
    width = math.ceil(min_side / step) * step
    while width <= max_side:
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))
