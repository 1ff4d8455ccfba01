"""SDXL-architecture models in txt2img/img2img (tiny_sdxl): the same pixels as plain diffusers, A1111-style prompts
for both text encoders, size conditioning, records and replay, memory switches, every scheduler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline.errors import UserError
from ldm_pipeline.schedulers import SCHEDULERS
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def xl(tiny_sdxl_model):
    from ldm_pipeline.generator import ImageGenerator
    from ldm_pipeline.settings import RuntimeOptions

    return ImageGenerator.load(str(tiny_sdxl_model), RuntimeOptions(device="cpu"))


@pytest.fixture(scope="module")
def plain(tiny_sdxl_model):
    """Plain diffusers, as a user would load the folder, with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def arr(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_init_model_writes_a_folder_plain_diffusers_loads(tiny_sdxl_model, plain, xl):
    assert type(plain).__name__ == "StableDiffusionXLPipeline" and xl.xl
    assert json.loads((tiny_sdxl_model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    im = plain("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (64, 64)
    assert (xl.defaults.height, xl.defaults.width, xl.defaults.scheduler) == (64, 64, "euler")


def test_txt2img_and_img2img_are_pixel_identical_to_plain_diffusers(xl, plain, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ours = xl.txt2img("a red circle", seed=3, scheduler="ddim", num_inference_steps=5)[0]
    ref = plain("a red circle", num_inference_steps=5, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(arr(ours), arr(ref))
    neg = xl.txt2img("a red circle", negative_prompt="blue", seed=3, scheduler="ddim", num_inference_steps=5)[0]
    ref_neg = plain("a red circle", negative_prompt="blue", num_inference_steps=5, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(arr(neg), arr(ref_neg)) and not np.array_equal(arr(neg), arr(ours))
    init = tmp_path / "init.png"
    ours.save(init)
    edited = xl.img2img("a blue square", str(init), seed=1, scheduler="ddim", num_inference_steps=10, strength=0.5)[0]
    i2i = StableDiffusionXLImg2ImgPipeline(**plain.components, add_watermarker=False)
    ref_i2i = i2i("a blue square", image=Image.open(init), strength=0.5, num_inference_steps=10, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(arr(edited), arr(ref_i2i))


def test_clip_skip_is_diffusers_clip_skip_minus_one(xl, plain):
    ours = xl.txt2img("a red circle", seed=2, scheduler="ddim", num_inference_steps=3, clip_skip=2)[0]
    ref = plain("a red circle", num_inference_steps=3, guidance_scale=5.0, clip_skip=1,
                generator=torch.Generator().manual_seed(2)).images[0]
    assert np.array_equal(arr(ours), arr(ref))
    with pytest.raises(UserError, match="clip skip must be 1..3"):
        xl.txt2img("x", clip_skip=4, num_inference_steps=2)


def test_long_and_weighted_prompts_on_both_encoders(xl):
    from ldm_pipeline.prompts import encode_prompt_pair_xl

    toks, tes = [xl.pipe.tokenizer, xl.pipe.tokenizer_2], xl.text_encoders
    long = "a red circle, " * 40  # 200 tokens: three chunks
    pe, ne, pooled, neg_pooled = encode_prompt_pair_xl(toks, tes, long, "")
    assert pe.shape == (1, 3 * 77, 80) and ne.shape == pe.shape
    assert not ne.any() and not neg_pooled.any()  # empty negative: zeros, as SDXL base's force_zeros_for_empty_prompt
    # the pooled embedding is the second encoder's for the first chunk (A1111): words in a later chunk leave it be
    assert pooled.shape == (1, 32)
    assert torch.equal(pooled, encode_prompt_pair_xl(toks, tes, long + " a blue square", "")[2])
    assert not torch.equal(pooled, encode_prompt_pair_xl(toks, tes, "a blue square, " + long, "")[2])
    plainw = encode_prompt_pair_xl(toks, tes, "a red circle", "")[0]
    weighted = encode_prompt_pair_xl(toks, tes, "a (red:1.5) circle", "")[0]
    assert plainw.shape == weighted.shape and not torch.equal(plainw, weighted)
    # both encoders' halves change with the weight
    assert not torch.equal(plainw[..., :32], weighted[..., :32]) and not torch.equal(plainw[..., 32:], weighted[..., 32:])
    images = xl.txt2img(["a (red:1.4) circle BREAK on blue", long], seed=1, num_inference_steps=2)
    assert all(im.size == (64, 64) for im in images)


def test_size_conditioning_changes_the_image_and_is_checked(xl, generator):
    base = dict(seed=4, num_inference_steps=3)
    ref = arr(xl.txt2img("a red circle", **base)[0])
    for kw in (dict(original_size=(256, 256)), dict(target_size=(32, 32)), dict(crop_top_left=(16, 0))):
        assert not np.array_equal(arr(xl.txt2img("a red circle", **base, **kw)[0]), ref), kw
    same = xl.txt2img("a red circle", **base, original_size=(64, 64), target_size=(64, 64), crop_top_left=(0, 0))
    assert np.array_equal(arr(same[0]), ref)  # diffusers' defaults: the image's own size, no crop
    with pytest.raises(UserError, match="two whole numbers >= 1"):
        xl.txt2img("x", original_size=(0, 64), num_inference_steps=2)
    with pytest.raises(UserError, match="SDXL size conditioning"):
        generator.txt2img("x", original_size=(64, 64), num_inference_steps=2)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_samples_sdxl(xl, name):
    from ldm_pipeline.schedulers import check_steps

    steps = next(n for n in range(4, 40) if check_steps(name, xl._scheduler(name), n, False) is None)
    im = arr(xl.txt2img("a red circle", seed=0, scheduler=name, num_inference_steps=steps)[0])
    assert im.std() > 0  # drawn, not flat or NaN (NaN would be a NonFiniteImageError)


def test_guidance_cutoff_and_memory_switches(tiny_sdxl_model, xl):
    from ldm_pipeline.generator import ImageGenerator
    from ldm_pipeline.settings import RuntimeOptions

    base = dict(seed=6, num_inference_steps=4, scheduler="ddim")
    ref = arr(xl.txt2img("a red circle", **base)[0])
    cut = arr(xl.txt2img("a red circle", guidance_cutoff=0.5, **base)[0])
    assert not np.array_equal(cut, ref)
    lean = ImageGenerator.load(str(tiny_sdxl_model), RuntimeOptions(device="cpu", attention_slicing=True,
                                                                    vae_slicing=True, vae_tiling=True))
    out = arr(lean.txt2img("a red circle", **base)[0])
    assert np.abs(out - ref).max() <= 2  # same computation, sliced: at most rounding


def test_cli_records_and_replays_sdxl_bit_exactly(tiny_sdxl_model, tmp_path):
    from ldm_pipeline.cli.txt2img import main

    out = tmp_path / "out"
    r = run_cli("txt2img", "a (red:1.2) circle", "--model", str(tiny_sdxl_model), "--seed", "5", "--steps", "4",
                "--original-size", "128x96", "--crop-top-left", "4,0", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    png = out / "00000-5.png"
    record = json.loads(Image.open(png).info["ldm_pipeline"])
    assert (record["original_size"], record["target_size"], record["crop_top_left"]) == ([96, 128], [64, 64], [4, 0])
    assert "Sampler: Euler, CFG scale: 5, Seed: 5, Size: 64x64" in Image.open(png).info["parameters"]
    assert main(["--replay", str(png), "-o", str(tmp_path / "again"), "-q"]) == 0
    assert np.array_equal(arr(Image.open(png)), arr(Image.open(tmp_path / "again" / "00000-5.png")))
    with pytest.raises(SystemExit) as bad:  # argparse: a size is WIDTHxHEIGHT
        main(["x", "--model", str(tiny_sdxl_model), "--original-size", "64", "-q"])
    assert bad.value.code == 2


@pytest.mark.slow
def test_two_processes_split_sdxl_prompts(tiny_sdxl_model, tmp_path):
    from tests.conftest import run_torchrun

    common = ["a red circle", "a blue square", "--model", str(tiny_sdxl_model), "--steps", "3", "--seed", "7"]
    r = run_torchrun("txt2img", *common, "--outdir", str(tmp_path / "dist"), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    r1 = run_cli("txt2img", *common, "--outdir", str(tmp_path / "one"), "-q", env={"OMP_NUM_THREADS": "1"})
    assert r1.returncode == 0, r1.stderr
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "dist").glob("*.png")) and len(names) == 2
    for name in names:
        assert np.array_equal(arr(Image.open(tmp_path / "dist" / name)), arr(Image.open(tmp_path / "one" / name)))
