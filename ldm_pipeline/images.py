"""Images going in: init images for img2img (found by file, folder or glob; read, EXIF-rotated, made RGB, fitted to
the size asked) and the one RGB conversion that generation and training data share."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_pipeline.errors import UserError

if TYPE_CHECKING:
    from ldm_pipeline.data.stats import DataStats

def expand_image_paths(spec: str) -> list[str]:
    """A file, a folder (its images, sorted) or a glob → image paths; a UserError when nothing matches."""
    import glob

    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
    p = Path(spec).expanduser()
    if p.is_dir():
        paths = sorted(str(x) for x in p.iterdir() if x.suffix.lower() in exts)
        if not paths:
            raise UserError(f"no images in folder {spec} (looked for {', '.join(exts)})")
        return paths
    if p.is_file():
        return [str(p)]
    if any(c in spec for c in "*?["):
        paths = sorted(x for x in glob.glob(os.path.expanduser(spec)) if Path(x).suffix.lower() in exts)
        if not paths:
            raise UserError(f"no images match {spec}")
        return paths
    raise UserError(f"init image not found: {spec}")


def check_image_readable(path: str) -> None:
    """Fail early (before any model loads) on a missing or non-image init image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read init image {path}: {str(e).splitlines()[0][:200]}") from None


def load_init_image(path: str, height: int | None, width: int | None, mode: str, factor: int):
    """Open an init image (EXIF-rotated, RGB) and fit it to (width, height), or to its own size rounded to the VAE
    factor when no size is given; returns (image, (width, height))."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = to_rgb(im)
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read init image {path}: {str(e).splitlines()[0][:200]}") from None
    if width is None or height is None:
        w, h = im.size
        rnd = {"crop": math.floor, "pad": math.ceil, "stretch": round}[mode]
        tw = width or max(factor, rnd(w / factor) * factor)
        th = height or max(factor, rnd(h / factor) * factor)
    else:
        tw, th = width, height
    return fit_image(im, tw, th, mode), (tw, th)


def fit_image(im, width: int, height: int, mode: str):
    """Resize to exactly (width, height): ``crop`` fills and centre-crops, ``pad`` fits and pads with the edge
    colour mean, ``stretch`` ignores the aspect ratio."""
    from PIL import Image

    if im.size == (width, height):
        return im
    if mode == "stretch":
        return im.resize((width, height), Image.LANCZOS)
    w, h = im.size
    if mode == "crop":
        s = max(width / w, height / h)
        nw, nh = max(width, round(w * s)), max(height, round(h * s))
        im = im.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - width) // 2, (nh - height) // 2
        return im.crop((left, top, left + width, top + height))
    s = min(width / w, height / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    im = im.resize((nw, nh), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), _edge_colour(im))
    canvas.paste(im, ((width - nw) // 2, (height - nh) // 2))
    return canvas


def _edge_colour(im) -> tuple[int, int, int]:
    import numpy as np

    a = np.asarray(im)
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(x) for x in edge.mean(axis=0).round())


def to_rgb(img, stats: DataStats | None = None):
    """Any PIL mode → RGB: alpha composited on white, 16/32-bit scaled to 8-bit, CMYK/palette/gray converted."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if stats is not None:
        stats.note(f"converted_{mode.replace(';', '_')}")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    if mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")
