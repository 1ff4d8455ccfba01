"""Generation behaviour a user relies on, on the tiny random model (in-process, fast)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline.errors import UserError
from ldm_pipeline.pipeline import Job, fit_image, load_init_image
from ldm_pipeline.schedulers import SCHEDULERS

PROMPT = "a red circle on a blue background"


def px(im) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def one(generator, **kw):
    kw.setdefault("num_inference_steps", 4)
    return next(generator.generate([Job(PROMPT, **kw)])).image


def test_same_seed_same_image_other_seed_differs(generator):
    a, b, c = one(generator, seed=1), one(generator, seed=1), one(generator, seed=2)
    assert np.array_equal(px(a), px(b))
    assert not np.array_equal(px(a), px(c))
    assert a.size == (64, 64)  # the model's default size


def test_image_i_uses_seed_plus_i_and_batching_does_not_change_it(generator):
    jobs = [Job(PROMPT, seed=10 + i, index=i, num_inference_steps=4, scheduler="euler-a") for i in range(3)]
    batched = [r.image for r in generator.generate(jobs, batch_size=3)]
    alone = one(generator, seed=12, scheduler="euler-a")
    assert np.array_equal(px(batched[2]), px(alone))
    assert not np.array_equal(px(batched[0]), px(batched[1]))


def test_cfg_scale_changes_output_and_1_skips_uncond(generator, monkeypatch):
    a = one(generator, seed=3, guidance_scale=7.5)
    b = one(generator, seed=3, guidance_scale=2.0)
    assert not np.array_equal(px(a), px(b))
    calls = []
    unet = generator.pipe.unet
    orig = unet.forward
    monkeypatch.setattr(unet, "forward", lambda sample, *a, **k: (calls.append(sample.shape[0]), orig(sample, *a, **k))[1])
    one(generator, seed=3, guidance_scale=1.0)
    assert set(calls) == {1}  # no unconditional half
    calls.clear()
    one(generator, seed=3, guidance_scale=3.0)
    assert set(calls) == {2}


def test_negative_prompt_and_rescale_change_output(generator):
    base = one(generator, seed=4)
    assert not np.array_equal(px(base), px(one(generator, seed=4, negative_prompt="green")))
    assert not np.array_equal(px(base), px(one(generator, seed=4, guidance_rescale=0.7)))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_and_differs_from_ddim(generator, name):
    im = one(generator, seed=5, scheduler=name, num_inference_steps=3)
    assert im.size == (64, 64)
    if name != "ddim":
        assert not np.array_equal(px(im), px(one(generator, seed=5, scheduler="ddim", num_inference_steps=3)))


def test_eta_changes_ddim_only(generator):
    assert not np.array_equal(px(one(generator, seed=6, eta=1.0)), px(one(generator, seed=6, eta=0.0)))
    with pytest.raises(UserError, match="--eta applies to"):
        one(generator, seed=6, eta=0.5, scheduler="euler")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"height": 62}, "multiple of 4"),
        ({"num_inference_steps": 0}, "at least 1"),
        ({"scheduler": "nope"}, "unknown scheduler"),
        ({"seed": -1}, "seed"),
        ({"clip_skip": 0}, "clip skip"),
        ({"clip_skip": 3}, "clip skip must be 1..2"),
    ],
)
def test_bad_settings(generator, kw, message):
    kw.setdefault("seed", 0)
    with pytest.raises(UserError, match=message):
        generator.resolve(Job(PROMPT, **kw))


def test_non_square_sizes(generator):
    im = one(generator, seed=1, height=32, width=96)
    assert im.size == (96, 32)


def test_long_prompt_generates(generator):
    long = ", ".join(f"detail {i}" for i in range(80))
    im = one(generator, seed=1, prompt=None) if False else next(
        generator.generate([Job(long, seed=1, num_inference_steps=2)])
    ).image
    assert im.size == (64, 64)


@pytest.fixture()
def init_png(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:] = (40, 80, 220)
    arr[16:48, 16:48] = (220, 40, 40)
    arr = np.clip(arr.astype(int) + rng.integers(-5, 5, arr.shape), 0, 255).astype(np.uint8)
    p = tmp_path / "init.png"
    Image.fromarray(arr).save(p)
    return p


def test_img2img_strength(generator, init_png, monkeypatch):
    def edit(strength, seed=0):
        job = Job(PROMPT, seed=seed, init_image=str(init_png), strength=strength, num_inference_steps=10)
        return px(next(generator.generate([job])).image)

    # strength decides how much of the schedule runs: int(10 * s) denoising steps
    calls = []
    unet = generator.pipe.unet
    orig = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    edit(0.3)
    assert len(calls) == 3
    calls.clear()
    edit(1.0)
    assert len(calls) == 10
    monkeypatch.undo()
    # low strengths stay close to each other (near the init image); full strength goes elsewhere
    low, lower, high = edit(0.1), edit(0.2), edit(1.0)
    assert np.abs(low - lower).mean() < np.abs(low - high).mean()
    assert np.array_equal(edit(0.5), edit(0.5))  # deterministic
    assert not np.array_equal(edit(0.5, seed=0), edit(0.5, seed=1))


def test_img2img_bad_strength(generator, init_png):
    for s in (0.0, 1.5):
        with pytest.raises(UserError, match="strength"):
            generator.resolve(Job(PROMPT, seed=0, init_image=str(init_png), strength=s))


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_resize_modes(tmp_path, mode):
    im = Image.new("RGB", (100, 50), (255, 0, 0))
    out = fit_image(im, 64, 64, mode)
    assert out.size == (64, 64)
    p = tmp_path / "odd.png"
    Image.new("RGB", (70, 45), (0, 255, 0)).save(p)
    fitted, size = load_init_image(str(p), None, None, mode, 8)
    assert size == {"crop": (64, 40), "pad": (72, 48), "stretch": (72, 48)}[mode] and fitted.size == size
    if mode == "pad":  # padding keeps the whole image: a 2:1 image in a square has bars
        assert out.getpixel((32, 2)) != (255, 0, 0) or out.getpixel((32, 32)) == (255, 0, 0)


def test_init_image_modes_and_exif(tmp_path):
    from ldm_pipeline.pipeline import _to_rgb

    for mode in ("RGBA", "LA", "P", "L", "CMYK", "I;16"):
        im = Image.new(mode, (8, 8))
        assert _to_rgb(im).mode == "RGB"
    # EXIF orientation 6 (rotate 90° CW) is applied
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    fitted, size = load_init_image(str(p), None, None, "crop", 4)
    assert size == (20, 40)


def test_unreadable_init_image(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read init image"):
        load_init_image(str(p), 64, 64, "crop", 4)


def test_python_api(generator, init_png):
    ims = generator.txt2img(["a cat", "a dog"], num_images=2, seed=7, num_inference_steps=2, batch_size=2)
    assert len(ims) == 4
    again = generator.txt2img("a dog", seed=9, num_inference_steps=2)  # image 2 of the run had seed 7+2
    assert np.array_equal(px(ims[2]), px(again[0]))
    edited = generator.img2img("a cat", init_image=init_png, strength=0.5, seed=1, num_inference_steps=4)
    assert edited[0].size == (64, 64)


def test_interop_pixel_identical_with_plain_diffusers(generator, tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ours = next(
        generator.generate([Job(PROMPT, seed=11, num_inference_steps=8, guidance_scale=6.0, scheduler="ddim")])
    ).image
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    ref = plain(
        PROMPT, num_inference_steps=8, guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(11)
    ).images[0]
    assert np.array_equal(px(ours), px(ref))


@pytest.mark.parametrize("flag", ["attention_slicing", "vae_slicing", "vae_tiling", "channels_last"])
def test_memory_switches_run_and_keep_the_image(tiny_model, generator, flag):
    from ldm_pipeline.pipeline import Generator, RuntimeOptions

    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", **{flag: True}))
    im = next(g.generate([Job(PROMPT, seed=1, num_inference_steps=3)])).image
    ref = one(generator, seed=1, num_inference_steps=3)
    assert np.abs(px(im) - px(ref)).max() <= 2  # same image up to float reordering


def test_cpu_offload_needs_a_gpu(tiny_model):
    from ldm_pipeline.pipeline import Generator, RuntimeOptions

    with pytest.raises(UserError, match="needs --device cuda"):
        Generator.load(str(tiny_model), RuntimeOptions(device="cpu", cpu_offload=True))


def test_bf16_runs(tiny_model):
    from ldm_pipeline.pipeline import Generator, RuntimeOptions

    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", dtype="bf16"))
    assert g.pipe.unet.dtype == torch.bfloat16
    im = next(g.generate([Job(PROMPT, seed=1, num_inference_steps=2)])).image
    assert im.size == (64, 64)


@pytest.mark.skipif(not __import__("shutil").which("gcc"), reason="torch.compile on CPU needs a C compiler")
def test_compile_runs(tiny_model):
    from ldm_pipeline.pipeline import Generator, RuntimeOptions

    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", compile=True))
    im = next(g.generate([Job(PROMPT, seed=1, num_inference_steps=1, guidance_scale=1.0)])).image
    assert im.size == (64, 64)
