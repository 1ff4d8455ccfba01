"""Inpainting masks prepared as A1111 does: inversion, edge blur, the "only masked" crop, outpainting's canvas, and
the paste-back that leaves every pixel outside the mask as it was."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline import masks
from ldm_pipeline.errors import UserError


def square_mask(size=(64, 48), box=(20, 10, 36, 26)) -> Image.Image:
    m = np.zeros(size[::-1], dtype=np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m, "L")


def noise_image(size=(64, 48), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_load_mask_greyscale_resized_and_inverted(tmp_path):
    Image.fromarray(np.full((24, 32, 3), 255, np.uint8)).save(tmp_path / "white.png")
    m = masks.load_mask(str(tmp_path / "white.png"), (64, 48))
    assert m.mode == "L" and m.size == (64, 48) and np.asarray(m).min() == 255
    assert np.asarray(masks.load_mask(str(tmp_path / "white.png"), (64, 48), invert=True)).max() == 0
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read mask"):
        masks.load_mask(str(tmp_path / "bad.png"), (8, 8))
    with pytest.raises(UserError, match="mask not found"):
        masks.load_mask(str(tmp_path / "missing.png"), (8, 8))


def test_blur_is_a1111s_kernel_symmetric_and_keeps_the_core():
    k = masks.gaussian_kernel(4)
    assert len(k) == 2 * int(2.5 * 4 + 0.5) + 1 == 21 and np.isclose(k.sum(), 1) and np.allclose(k, k[::-1])
    m = square_mask()
    assert masks.blur_mask(m, 0) is m
    b = np.asarray(masks.blur_mask(m, 4))
    assert b.shape == (48, 64) and b[18, 28] > 200 and b[0, 0] == 0  # the centre stays painted, far corners clean
    assert 0 < b[18, 18] < 255  # the edge is soft
    # a mask symmetric about its centre stays symmetric
    sym = np.asarray(masks.blur_mask(square_mask((64, 64), (16, 16, 48, 48)), 3), dtype=int)
    assert np.array_equal(sym, sym[::-1]) and np.array_equal(sym, sym[:, ::-1]) and np.array_equal(sym, sym.T)


def test_overlay_mask_doubles_the_blurred_mask():
    b = masks.blur_mask(square_mask(), 4)
    o = np.asarray(masks.overlay_mask(b), dtype=int)
    assert np.array_equal(o, np.minimum(np.asarray(b, dtype=int) * 2, 255))


def test_crop_region_grows_to_the_processing_ratio_inside_the_image():
    m = square_mask((100, 80), (40, 30, 50, 60))  # 10 wide, 30 tall
    assert masks.crop_region(m, 64, 64, 0) == (30, 30, 60, 60)  # square processing size: 30 x 30 around it
    assert masks.crop_region(square_mask((100, 80), (90, 30, 100, 60)), 64, 64, 0) == (70, 30, 100, 60)  # shifted in
    assert masks.crop_region(m, 64, 64, 32) == (5, 0, 85, 80)  # padded: 8..82 x 0..80, then widened to 80
    assert masks.crop_region(Image.new("L", (8, 8)), 8, 8, 4) is None


def test_pad_canvas_extends_to_the_vae_factor_and_masks_the_new_area():
    im = noise_image((60, 40))
    canvas, m = masks.pad_canvas(im, None, 10, 0, 5, 3, factor=8)
    assert canvas.size == (80, 48) and m.size == (80, 48)  # 60+10+5=75 → 80, 40+3=43 → 48
    a, mm = np.asarray(canvas), np.asarray(m)
    assert np.array_equal(a[0:40, 10:70], np.asarray(im))  # the image, where it was put
    assert (mm[0:40, 10:70] == 0).all() and (mm[:, :10] == 255).all() and (mm[40:] == 255).all()
    assert np.array_equal(a[5, 0], a[5, 10])  # the new area continues the edge pixels
    inner = square_mask((60, 40), (0, 0, 10, 10))
    _, m2 = masks.pad_canvas(im, inner, 8, 0, 0, 0)
    assert (np.asarray(m2)[0:10, 8:18] == 255).all() and (np.asarray(m2)[20:, 20:68] == 0).all()
    assert m2.size == (72, 40) and (np.asarray(m2)[:, 68:] == 255).all()  # 68 → 72: the extra 4 on the right
    with pytest.raises(UserError, match="--pad"):
        masks.pad_canvas(im, None, -1, 0, 0, 0)


@pytest.mark.parametrize("region", [None, (8, 4, 48, 44)])
def test_diffusers_overlay_leaves_every_unmasked_pixel_bit_identical(region):
    """What the inpainting command relies on diffusers' ``apply_overlay`` for (A1111's overlay), with our masks."""
    from diffusers.image_processor import VaeImageProcessor

    original, result = noise_image(seed=1), noise_image(seed=2)
    overlay = masks.overlay_mask(masks.blur_mask(square_mask(), 4))
    if region is not None:
        result = result.resize((64, 64))  # the processing size of an "only masked" crop
    out = np.asarray(VaeImageProcessor().apply_overlay(overlay, original, result, region))
    o, a = np.asarray(original), np.asarray(overlay)
    assert np.array_equal(out[a == 0], o[a == 0]) and (a == 0).sum() > 1000
    inside = a == 255
    assert inside.any() and not np.array_equal(out[inside], o[inside])
    if region is None:
        assert np.array_equal(out[inside], np.asarray(result)[inside])
