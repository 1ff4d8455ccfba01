"""Decode whatever image bytes the web gave us into RGB, and crop them to the training size.

Broken input is a `SkipSample` with a reason (never a crash); odd but usable input is fixed: CMYK, grayscale,
palette and 16-bit images become RGB, transparency is composited on white, EXIF orientation is applied.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_pipeline.data.stats import DataStats
from ldm_pipeline.images import to_rgb  # one conversion for training data and init images


class SkipSample(Exception):
    """This sample cannot be used; `reason` is its DataStats key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes | str, max_pixels: int, stats: DataStats | None = None) -> Image.Image:
    """Encoded bytes (or a file path) → RGB PIL image, EXIF orientation applied; raises SkipSample."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; a bomb in training data is a skip either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(data if isinstance(data, str) else io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise SkipSample("decompression_bomb")
            img.load()
        try:
            orientation = img.getexif().get(0x0112, 1)  # phones store pictures sideways plus an orientation tag
        except Exception:  # malformed EXIF is common in scraped data; the pixels are still fine
            orientation = 1
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
            if stats is not None:
                stats.note("exif_rotated")
        return to_rgb(img, stats)
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample("decompression_bomb") from None
    except UnidentifiedImageError:
        raise SkipSample("not_image") from None
    except FileNotFoundError:
        raise SkipSample("missing_file") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ... for broken files
        raise SkipSample("truncated_image" if "truncated" in str(e).lower() else "corrupt_image") from None


def resized_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) that `resize_and_crop` scales a `width` x `height` image to before cropping it to `size` (w, h):
    the smallest that covers it. The latent cache needs it to mirror a crop's corner (SDXL's crop conditioning)."""
    tw, th = size
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def resize_and_crop(img: Image.Image, size: tuple[int, int], center_crop: bool, random_flip: bool,
                    rng: random.Random) -> tuple[Image.Image, tuple[int, int], bool]:
    """Scale so the image covers `size` (w, h), crop to it, maybe flip; returns (image, (top, left), upscaled).

    The crop corner is in resized, unflipped coordinates mirrored when flipped (SDXL's crops_coords_top_left).
    """
    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = resized_size(w, h, size)
    if (nw, nh) != (w, h):
        # LANCZOS is the sharpest for shrinking; BICUBIC rings less when enlarging
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (nh - th) // 2, (nw - tw) // 2
    else:
        top, left = rng.randint(0, nh - th), rng.randint(0, nw - tw)
    img = img.crop((left, top, left + tw, top + th))
    flipped = random_flip and rng.random() < 0.5
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - tw
    return img, (top, left), scale > 1


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB image → uint8 [3, H, W] (kept small while a batch is pending)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float32 in [-1, 1], the range the VAE expects."""
    return pixels.float().div_(127.5).sub_(1.0)
