"""`DataConfig`: where the training images and captions come from and how they are prepared.

The training config nests it as ``data:``; it is filled by `ldm_pipeline.config.from_dict` like every other config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DataFormat = Literal["auto", "webdataset", "parquet", "imagefolder", "hf"]


@dataclass
class FilterConfig:
    """Sample filters on LAION metadata; a sample lacking the field passes that filter. None = filter off."""

    min_original_width: int | None = None  # skip images whose source was narrower (img2dataset original_width)
    min_original_height: int | None = None  # skip images whose source was lower (img2dataset original_height)
    max_punsafe: float | None = None  # skip samples with NSFW probability above this (LAION punsafe)
    max_pwatermark: float | None = None  # skip samples with watermark probability above this (LAION pwatermark)
    min_aesthetic: float | None = None  # skip samples scoring below this (aesthetic or AESTHETIC_SCORE)
    min_similarity: float | None = None  # skip samples whose CLIP image-text similarity is below this


@dataclass
class DataConfig:
    """Training data: source, decoding, filters, transforms, caption handling and loader settings."""

    source: str = ""  # directory, glob, brace range (shards/{00000..00099}.tar), URL (s3://, pipe:…) or HF name
    format: DataFormat = "auto"  # auto detects the layout (docs/data_formats.md); set it when detection guesses wrong
    image_column: str | None = None  # parquet/HF column holding image bytes; None = jpg/png/webp/image/img
    caption_column: str | None = None  # column / tar or caption-file extension of the caption; None = txt/caption/text
    hf_split: str = "train"  # split of a Hugging Face dataset
    resolution: int = 512  # training side length (square crops) or target area side (bucketing)
    center_crop: bool = True  # False = random crop
    random_flip: bool = False  # horizontal flip with probability 0.5
    bucketing: bool = False  # aspect-ratio buckets (kohya style) instead of square crops
    bucket_step: int = 64  # bucket sides are multiples of this
    min_bucket_side: int | None = None  # smallest bucket side; None = resolution // 2
    max_bucket_side: int | None = None  # largest bucket side; None = resolution * 2
    min_size: int | None = None  # skip images whose shorter side is below this (None = upscale them)
    max_image_pixels: int = 89_478_485  # skip larger images (decompression bombs); PIL's own limit also applies
    caption_dropout: float = 0.0  # probability of replacing the caption by "" (classifier-free guidance)
    shuffle_tags: bool = False  # shuffle comma-separated tags in captions
    keep_tags: int = 0  # number of leading tags kept in place when shuffling
    allow_empty_captions: bool = False  # False = skip samples without a caption ("no_caption")
    shuffle: bool = True  # shuffle shard order and samples within shards per epoch
    shuffle_buffer: int = 1000  # samples buffered to shuffle streamed (non-seekable URL) shards; 0 = off
    filters: FilterConfig = field(default_factory=FilterConfig)  # metadata filters
    num_workers: int = 2  # DataLoader worker processes per rank
    seed: int = 0  # seeds shuffling, crops, flips and caption dropout (all deterministic per (seed, epoch, key))
