"""Image grids: `ldm txt2img --grid`, validation samples during training, and evaluation grids with the prompt
written under each image.

Images are never stretched: a cell has the largest image's size and a smaller image sits centred in it. For
captioned grids small images (the shapes model makes 64×64) are enlarged by a whole factor with NEAREST, so
pixels stay sharp and a cell is wide enough for a readable caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

CAPTION_PAD = 4  # px around caption text
CAPTIONED_CELL_WIDTH = 128  # px: enough for a short prompt in PIL's default font
TEXT = (0, 0, 0)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` px; a word longer than a line is split by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            while font.getlength(word) > width and len(word) > 1:  # hard-break overlong words
                cut = max(1, next((k for k in range(len(word), 0, -1) if font.getlength(word[:k]) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def make_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int | None = None,
              cell_caption_height: int | None = None, min_cell_width: int | None = None) -> Image.Image:
    """A rows × cols grid (near square by default), with `captions[i]` wrapped under image i when given.

    Cells have the largest image's size, enlarged by a whole factor (NEAREST) until a cell is at least
    `min_cell_width` px wide (default: 128 with captions, no enlarging without); smaller images sit centred in
    their cell. `cell_caption_height` fixes the caption strip (lines that do not fit are cut with "…"); by
    default it fits the longest caption. Background: white behind captions, black in a plain grid.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n = len(images)
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    w, h = max(im.width for im in images), max(im.height for im in images)
    if min_cell_width is None:
        min_cell_width = CAPTIONED_CELL_WIDTH if captions is not None else 1
    scale = max(1, math.ceil(min_cell_width / w))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [_wrap(c, font, cw - 2 * CAPTION_PAD) for c in captions] if captions is not None else []
    if captions is None:
        cap_h = 0
    elif cell_caption_height is not None:
        cap_h = cell_caption_height
    else:
        cap_h = max(len(lines) for lines in wrapped) * line_h + 2 * CAPTION_PAD
    background = (255, 255, 255) if captions is not None else (0, 0, 0)
    grid = Image.new("RGB", (cols * cw, rows * (ch + cap_h)), background)
    draw = ImageDraw.Draw(grid)
    fit = max(0, (cap_h - 2 * CAPTION_PAD) // line_h)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if scale > 1:
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        x, y = (i % cols) * cw, (i // cols) * (ch + cap_h)
        grid.paste(im, (x + (cw - im.width) // 2, y + (ch - im.height) // 2))
        if captions is None:
            continue
        lines = wrapped[i]
        if len(lines) > fit:
            lines = lines[:fit]
            if lines:
                lines[-1] = lines[-1].rstrip()[:-1] + "…" if len(lines[-1]) > 1 else "…"
        for k, line in enumerate(lines):
            draw.text((x + CAPTION_PAD, y + ch + CAPTION_PAD + k * line_h), line, fill=TEXT, font=font)
    return grid
