"""Inpainting masks the way AUTOMATIC1111 prepares them: white repaints, black keeps; inversion; A1111's Gaussian
blur of the mask's edge and the overlay mask made from it; the padded crop around the masked area that "only
masked" (inpaint full resolution) works on; and outpainting's extended canvas.

diffusers' inpainting pipeline does the denoising (latent blending for ordinary UNets, the 9-channel UNet for
inpainting models) and its image processor has A1111's crop region and overlay (``apply_overlay``, which puts every
pixel outside the mask back exactly as it was); what it lacks (A1111's blur kernel — its own ``blur`` is PIL's —,
inversion, outpainting) lives here as plain functions on PIL images and numpy arrays.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ldm_pipeline.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

FILLS = ("original", "latent-noise")  # what the masked area starts from (A1111's "Masked content")
FILL_NAMES = {"original": "original", "latent-noise": "latent noise"}  # as A1111 writes them in `parameters`


def load_mask(path: str, size: tuple[int, int], invert: bool = False) -> Image.Image:
    """The mask at `path` as an 8-bit greyscale image of `size` (width, height): white (255) repaints. An image with
    transparency counts its opaque pixels as painted only if they are light, as A1111's greyscale conversion does;
    a mask of another size is stretched to the image's (A1111 resizes it with the image)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mask = im.convert("L")
    except FileNotFoundError:
        raise UserError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read mask {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.LANCZOS)
    return ImageOps.invert(mask) if invert else mask


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A1111's mask-blur kernel: size 2·int(2.5σ + 0.5) + 1, normalised (what it hands cv2.GaussianBlur)."""
    import numpy as np

    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def blur_mask(mask: Image.Image, pixels: float) -> Image.Image:
    """Soften the mask's edge by a Gaussian of σ = `pixels` along x then y, borders reflected (cv2's default, which
    A1111 uses). numpy in floating point, rounded once: within 1/255 of cv2's fixed-point result."""
    import numpy as np
    from PIL import Image

    if pixels <= 0:
        return mask
    a = np.asarray(mask, dtype=np.float64)
    k = gaussian_kernel(pixels)
    r = len(k) // 2
    for axis in (1, 0):
        if a.shape[axis] > r:  # reflect-101 needs more pixels than the kernel's radius
            pad = [(0, 0), (0, 0)]
            pad[axis] = (r, r)
            padded = np.pad(a, pad, mode="reflect")
        else:
            padded = np.pad(a, [(r, r) if i == axis else (0, 0) for i in range(2)], mode="edge")
        a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def overlay_mask(mask: Image.Image) -> Image.Image:
    """The mask the result is pasted back through (whole-image inpainting): the blurred mask doubled and clipped,
    so the blur's inner half repaints fully and only its outer half blends (A1111's ``mask_for_overlay``)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8), "L")


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int] | None:
    """"Only masked": the box (x1, y1, x2, y2) around the mask's non-black pixels, grown by `pad` and then to the
    processing size's aspect ratio inside the image (diffusers' ``get_crop_region``, which is A1111's); None when
    nothing is masked (where diffusers' would divide by zero)."""
    from diffusers.image_processor import VaeImageProcessor

    if mask.getbbox() is None:
        return None
    return VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)


def pad_canvas(image: Image.Image, mask: Image.Image | None, left: int, top: int, right: int, bottom: int,
               factor: int = 8) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the image on a canvas extended by the given pixels (each side rounded up so the canvas is a
    multiple of `factor`, the extra going to the right and bottom), the new area filled by stretching the edge
    pixels outwards; and the mask with the new area white (added to `mask`, if any)."""
    import numpy as np
    from PIL import Image

    if min(left, top, right, bottom) < 0:
        raise UserError(f"--pad takes four sizes >= 0 (got {left},{top},{right},{bottom})")
    w, h = image.size
    right += (math.ceil((w + left + right) / factor) * factor) - (w + left + right)
    bottom += (math.ceil((h + top + bottom) / factor) * factor) - (h + top + bottom)
    a = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    m = np.full((h + top + bottom, w + left + right), 255, dtype=np.uint8)
    m[top:top + h, left:left + w] = np.asarray(mask) if mask is not None else 0
    return Image.fromarray(a, "RGB"), Image.fromarray(m, "L")
