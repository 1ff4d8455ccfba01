"""Generation behaviour a user relies on, on the tiny random model (in-process, fast)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline.errors import UserError
from ldm_pipeline.images import fit_image, load_init_image
from ldm_pipeline.schedulers import SCHEDULERS
from ldm_pipeline.settings import Job, jobs_from_api

PROMPT = "a red circle on a blue background"


def px(im) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def one(generator, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("prompt", PROMPT)
    return next(generator.generate([Job(**kw)])).image


def test_same_seed_same_image_other_seed_differs(generator):
    a, b, c = one(generator, seed=1), one(generator, seed=1), one(generator, seed=2)
    assert np.array_equal(px(a), px(b))
    assert not np.array_equal(px(a), px(c))
    assert a.size == (64, 64)  # the model's default size


@pytest.mark.parametrize("sampler", [{"scheduler": "euler-a"}, {"scheduler": "ddim", "eta": 1.0}])
def test_batched_image_is_its_single_counterpart_up_to_rounding(generator, sampler):
    # different prompts, each image on its own generator; both samplers draw fresh noise at every step
    prompts = ["a red circle", "a blue square on a green background", "a cat"]
    jobs = [Job(p, seed=10 + i, index=i, num_inference_steps=4, **sampler) for i, p in enumerate(prompts)]
    batched = list(generator.generate(jobs, batch_size=3))
    alone = [one(generator, prompt=p, seed=10 + i, **sampler) for i, p in enumerate(prompts)]
    for b, a in zip(batched, alone):
        diff = np.abs(px(b.image) - px(a))
        assert diff.max() <= 2 and diff.mean() < 0.1  # batched convolutions only round differently
    # what seed i+1 alone gives is far from image i: the per-image noise really is seed + i
    assert np.abs(px(batched[1].image) - px(one(generator, prompt=prompts[1], seed=10, **sampler))).mean() > 5
    # so each record names its batch, and replay can rebuild exactly that batch
    rec = batched[1].record["batch"]
    assert rec["size"] == 3 and rec["position"] == 1
    assert [(m["prompt"], m["seed"]) for m in rec["members"]] == [(p, 10 + i) for i, p in enumerate(prompts)]
    assert "batch" not in next(generator.generate(jobs[:1])).record


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


def unet_calls(generator, monkeypatch) -> list[tuple[int, int]]:
    """(timestep, batch rows) of every UNet forward from now on."""
    calls = []
    unet = generator.pipe.unet
    orig = unet.forward

    def forward(sample, t, *a, **k):
        calls.append((int(t), sample.shape[0]))
        return orig(sample, t, *a, **k)

    monkeypatch.setattr(unet, "forward", forward)
    return calls


def test_guidance_cutoff_guides_only_the_noisy_steps(generator, monkeypatch):
    calls = unet_calls(generator, monkeypatch)
    base = one(generator, seed=3, guidance_scale=5.0, num_inference_steps=10)
    assert {rows for _, rows in calls} == {2}  # the tiny model's default: every step guided
    calls.clear()
    cut = one(generator, seed=3, guidance_scale=5.0, num_inference_steps=10, guidance_cutoff=0.5)
    assert [rows for _, rows in calls] == [2 if t >= 500 else 1 for t, _ in calls]
    assert {rows for _, rows in calls} == {1, 2}
    assert not np.array_equal(px(base), px(cut))
    # 0 is off; 1 guides no step at all, which is CFG 1
    assert np.array_equal(px(base), px(one(generator, seed=3, guidance_scale=5.0, num_inference_steps=10,
                                             guidance_cutoff=0.0)))
    calls.clear()
    none = one(generator, seed=3, guidance_scale=5.0, num_inference_steps=10, guidance_cutoff=1.0)
    assert {rows for _, rows in calls} == {1}
    assert np.array_equal(px(none), px(one(generator, seed=3, guidance_scale=1.0, num_inference_steps=10)))


def test_guidance_cutoff_in_a_batch_keeps_each_prompt(generator):
    # diffusers' SDCFGCutoffCallback keeps only the last prompt's embedding after the cut-off; ours keeps all
    prompts = ["a red circle", "a blue square on a green background", "a cat"]
    kw = dict(num_inference_steps=6, guidance_scale=5.0, guidance_cutoff=0.6)
    jobs = [Job(p, seed=10 + i, index=i, **kw) for i, p in enumerate(prompts)]
    for i, (b, p) in enumerate(zip(generator.generate(jobs, batch_size=3), prompts)):
        diff = np.abs(px(b.image) - px(one(generator, prompt=p, seed=10 + i, **kw)))
        assert diff.max() <= 2 and diff.mean() < 0.1
        assert b.record["guidance_cutoff"] == 0.6


def test_guidance_cutoff_judges_img2img_by_its_own_timesteps(generator, init_png, monkeypatch):
    calls = unet_calls(generator, monkeypatch)
    kw = dict(prompt=PROMPT, seed=0, init_image=str(init_png), strength=0.5, num_inference_steps=10, guidance_scale=5.0)
    next(generator.generate([Job(**kw, guidance_cutoff=0.3)]))
    assert len(calls) == 5 and [rows for _, rows in calls] == [2 if t >= 300 else 1 for t, _ in calls]
    assert {rows for _, rows in calls} == {1, 2}
    calls.clear()
    next(generator.generate([Job(**kw, guidance_cutoff=0.6)]))  # starts below the cut-off: no step guided
    assert len(calls) == 5 and {rows for _, rows in calls} == {1}


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
    # diffusers' DDPMScheduler.step takes no eta (the pipeline drops it silently): refused, not recorded falsely
    for scheduler in ("euler", "ddpm"):
        with pytest.raises(UserError, match=f"--eta applies to the ddim scheduler only, not {scheduler}"):
            one(generator, seed=6, eta=0.5, scheduler=scheduler)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"height": 62}, "--height 62 is not a multiple of 8"),
        # multiples of the VAE factor 4 but not of 8: StableDiffusionPipeline.check_inputs would raise a ValueError
        ({"height": 68}, r"--height 68 is not a multiple of 8 \(txt2img needs multiples of both .* VAE factor 4"),
        ({"width": 36}, "--width 36 is not a multiple of 8"),
        ({"num_inference_steps": 0}, "steps must be at least 1"),
        ({"scheduler": "nope"}, "unknown scheduler"),
        ({"seed": -2}, r"seed must be -1 \(random\) or 0\.\.18446744073709551615"),
        ({"seed": 2**64}, "seed must be -1"),
        ({"clip_skip": 0}, "clip skip must be at least 1"),
        ({"clip_skip": 3}, "clip skip must be 1..2"),
        ({"guidance_rescale": 1.5}, r"guidance rescale must be in \[0, 1\]"),
        ({"guidance_cutoff": -0.1}, r"guidance cutoff must be in \[0, 1\]"),
        ({"eta": -0.5}, "eta must be in \\[0, 1\\]"),
    ],
)
def test_bad_settings(generator, kw, message):
    kw.setdefault("seed", 0)
    with pytest.raises(UserError, match=message):
        generator.resolve(Job(PROMPT, **kw))


def test_seed_minus_one_is_random_and_largest_seed_works(generator):
    seeds = {generator.resolve(Job(PROMPT, seed=-1)).seed for _ in range(3)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
    assert one(generator, seed=2**64 - 1, num_inference_steps=1).size == (64, 64)
    # image i of an API run gets seed + i, wrapping past 2**64 - 1 instead of overflowing torch's manual_seed
    assert [j.seed for j in jobs_from_api("x", {"seed": 2**64 - 1, "num_images": 2})] == [2**64 - 1, 0]


def test_img2img_sizes_need_only_the_vae_factor(generator, init_png):
    job = generator.resolve(Job(PROMPT, seed=0, init_image=str(init_png), height=68, width=36))
    assert (job.height, job.width) == (68, 36)
    assert generator.size_multiple(img2img=True) == 4 and generator.size_multiple(img2img=False) == 8


def test_img2img_with_no_denoising_step_is_a_user_error(generator, init_png):
    # diffusers runs int(steps * strength) steps; 0 would end in a RuntimeError deep in the pipeline
    with pytest.raises(UserError, match=r"strength 0\.05 × 10 steps leaves no denoising step.*--strength 0\.1 or more, "
                                        r"or --steps 20 or more"):
        generator.resolve(Job(PROMPT, seed=0, init_image=str(init_png), strength=0.05, num_inference_steps=10))
    job = Job(PROMPT, seed=0, init_image=str(init_png), strength=0.1, num_inference_steps=10)
    assert next(generator.generate([job])).image.size == (64, 64)  # one step is fine


def test_non_square_sizes(generator):
    im = one(generator, seed=1, height=32, width=96)
    assert im.size == (96, 32)


def test_long_prompt_generates(generator):
    long = ", ".join(f"detail {i}" for i in range(80))
    im = one(generator, prompt=long, seed=1, num_inference_steps=2)
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
    # a 2:1 red image with a green stripe at its left edge, fitted into a square
    im = Image.new("RGB", (100, 50), (255, 0, 0))
    im.paste((0, 255, 0), (0, 0, 10, 50))
    out = fit_image(im, 64, 64, mode)
    assert out.size == (64, 64)
    left, centre, top = out.getpixel((1, 32)), out.getpixel((32, 32)), out.getpixel((32, 2))
    assert centre == (255, 0, 0)
    if mode == "crop":  # fills the square: the left edge (and its stripe) is cut off, no bars
        assert left == (255, 0, 0) and top == (255, 0, 0)
    elif mode == "pad":  # keeps the whole image: the stripe stays, bars above and below in the edge colour
        assert left[1] > 200 and left[0] < 50
        bar = tuple(int(x) for x in np.asarray(out)[:16].reshape(-1, 3).mean(axis=0).round())
        assert top == bar and top not in ((255, 0, 0), (0, 255, 0))  # uniform bar, neither colour of the image
        assert out.getpixel((32, 15)) == top and out.getpixel((32, 17))[0] > 200  # the image starts at row 16
    else:  # stretch: the stripe stays and the image fills the square (no bars)
        assert left[1] > 200 and top == (255, 0, 0)
    p = tmp_path / "odd.png"
    Image.new("RGB", (70, 45), (0, 255, 0)).save(p)
    fitted, size = load_init_image(str(p), None, None, mode, 8)
    assert size == {"crop": (64, 40), "pad": (72, 48), "stretch": (72, 48)}[mode] and fitted.size == size


def test_init_image_modes_and_exif(tmp_path):
    from ldm_pipeline.images import to_rgb

    for mode in ("RGBA", "LA", "P", "L", "CMYK", "I;16"):
        im = Image.new(mode, (8, 8))
        assert to_rgb(im).mode == "RGB"
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
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", **{flag: True}))
    im = next(g.generate([Job(PROMPT, seed=1, num_inference_steps=3)])).image
    ref = one(generator, seed=1, num_inference_steps=3)
    assert np.abs(px(im) - px(ref)).max() <= 2  # same image up to float reordering


def test_cpu_offload_needs_a_gpu(tiny_model):
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    with pytest.raises(UserError, match="needs --device cuda"):
        Generator.load(str(tiny_model), RuntimeOptions(device="cpu", cpu_offload=True))


def test_bf16_runs(tiny_model):
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", dtype="bf16"))
    assert g.pipe.unet.dtype == torch.bfloat16
    im = next(g.generate([Job(PROMPT, seed=1, num_inference_steps=2)])).image
    assert im.size == (64, 64)


def test_compile_compiles_the_unet(tiny_model, monkeypatch):
    # the compiler itself runs in the slow tier (tests/test_fast.py: tens of seconds on CPU); here: --compile reaches
    # torch.compile with the UNet, and the pipeline still draws through what it returns
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    g = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", compile=True))
    assert compiled == [g.pipe.unet]
    assert one(g, seed=1, num_inference_steps=2).size == (64, 64)


def test_resolve_device_errors_are_one_line(monkeypatch):
    from ldm_pipeline.settings import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in [("cuda", "no CUDA GPU"), ("cuda:1", "--device cuda:1: no CUDA GPU"),
                          ("mps", "Apple MPS is not available"), ("cuda:x", "unknown --device"), ("tpu", "unknown")]:
        with pytest.raises(UserError, match=message):
            resolve_device(name)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(UserError, match="has 1 CUDA GPU"):
        resolve_device("cuda:1")


def test_save_png_without_hard_links_and_never_overwrites(tmp_path, monkeypatch):
    import errno
    import os

    from ldm_pipeline.outputs import save_png

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT/exFAT and some FUSE mounts answer

    monkeypatch.setattr(os, "link", no_links)
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first = save_png(red, tmp_path / "00000-1.png")
    second = save_png(blue, tmp_path / "00000-1.png")  # the name is taken: the next number up
    assert (first.name, second.name) == ("00000-1.png", "00001-1.png")
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0) and Image.open(second).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png", "00001-1.png"]  # no temporary files left


def test_save_failure_is_a_user_error_naming_the_path(tmp_path, monkeypatch):
    import errno

    from ldm_pipeline.outputs import save_png

    im = Image.new("RGB", (8, 8))

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(im, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*00000-1\.png: No space left on device"):
        save_png(im, tmp_path / "00000-1.png")
    assert not list(tmp_path.iterdir())


def test_grid_of_mixed_sizes_is_not_stretched():
    from ldm_pipeline.grid import make_grid

    big, small = Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    grid = make_grid([big, small])
    assert grid.size == (128, 32)  # cells of the largest size
    a = np.asarray(grid)
    blue = np.argwhere((a == (0, 0, 255)).all(axis=-1))
    assert len(blue) == 16 * 16  # the small image keeps its 16x16 pixels, centred in its cell
    assert blue.min(axis=0).tolist() == [8, 88] and (a[:, :64] == (255, 0, 0)).all()


def test_nan_latents_are_refused_not_saved_as_black(generator, monkeypatch):
    from ldm_pipeline.generator import NonFiniteImageError

    unet = generator.pipe.unet
    orig = unet.forward

    def nan_unet(sample, *a, **k):
        out = orig(sample, *a, **k)
        out[0][:] = float("nan")  # the pipeline asks for return_dict=False: a tuple
        return out

    monkeypatch.setattr(unet, "forward", nan_unet)
    with pytest.raises(NonFiniteImageError, match="seed 5 came out as NaN/inf"):
        one(generator, seed=5)


@pytest.mark.parametrize("settings", [{"scheduler": "euler"}, {"scheduler": "heun"},
                                      {"scheduler": "dpm++2m", "init_image": "IMG", "strength": 0.5}])
def test_progress_hook_sees_every_denoising_step(generator, settings, tmp_path):
    if settings.get("init_image"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "i.png")
        settings = {**settings, "init_image": str(tmp_path / "i.png")}
    jobs = [generator.resolve(Job(PROMPT, seed=i, index=i, num_inference_steps=6, **settings)) for i in range(2)]
    seen = []
    list(generator.generate(jobs, batch_size=2, on_step=lambda batch: seen.append(len(batch))))
    assert sum(seen) == sum(generator.step_count(j) for j in jobs)  # the progress bar's total is what runs
    assert set(seen) == {2}  # one call per step of the batch, which moves both images
    expected = {"euler": 6, "heun": 11, "dpm++2m": 3}[settings["scheduler"]]  # heun: 2 passes a step; img2img: the tail
    assert generator.step_count(jobs[0]) == expected


def test_the_record_says_the_dtype_that_ran(tiny_model, monkeypatch):
    import ldm_pipeline.models as models
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    real = models.load_pipeline
    # an older diffusers ignored `dtype=` and loaded fp32 while the PNG said bf16
    monkeypatch.setattr(models, "load_pipeline", lambda *a, torch_dtype=None, **k: real(*a, **k))
    gen = Generator.load(str(tiny_model), RuntimeOptions(device="cpu", dtype="bf16"))
    assert gen.pipe.unet.dtype == torch.bfloat16 and gen.pipe.text_encoder.dtype == torch.bfloat16
    rec = next(gen.generate([Job(PROMPT, seed=1, num_inference_steps=2)])).record
    assert rec["dtype"] == "bf16"


def test_the_json_record_is_strict_json(generator):
    import json

    from ldm_pipeline.metadata import png_info

    rec = next(generator.generate([Job(PROMPT, seed=1, num_inference_steps=2, scheduler="dpm++2m")])).record
    png_info(rec)  # dumps the record with allow_nan=False: raises on NaN/Infinity
    text = json.dumps(rec, allow_nan=False)
    assert "_use_default_values" not in text  # diffusers' set-ordered bookkeeping: different bytes per process
    assert rec["scheduler_config"]["lambda_min_clipped"] == "-inf"
