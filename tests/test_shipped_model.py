"""The shipped shapes model: the offline default, small, and it really follows prompts (checked by the evaluator)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ldm_pipeline.models import SHIPPED_MODEL, default_model
from ldm_pipeline.shapes.scoring import classify, parse_prompt
from tests.conftest import run_cli

# `ldm recipe shapes --package` puts the model there; a source tree without it (a fork, a bare checkout) skips these.
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").is_file(), reason="no shipped model")

# (prompt, seed): held-in combinations, three per shape, some naming a position, and one held-out pair
PROMPTS = [
    ("a red circle on a blue background", 0),
    ("a black circle on a yellow background, on the right", 1),
    ("a purple circle on a green background", 2),  # held out of training
    ("a blue triangle on a white background", 3),
    ("a yellow triangle on a red background, at the top", 4),
    ("an orange triangle on a purple background", 5),
    ("a yellow square on a black background", 6),
    ("a white square on a purple background, on the left", 7),
    ("a blue square on an orange background, at the bottom", 8),
]
# The model card (seventh run, CFG 4 with guidance cut-off 0.35): colour 99 %, background 99.5 %, position 100 %,
# shape 97 % (squares 92 %), 0.5 % of images without a clean shape; these nine all come out right. Each check allows
# one miss, so a model within its card's rates does not make the test a coin toss
MIN_LAYOUT_RIGHT = len(PROMPTS) - 1
MIN_ALL_RIGHT = len(PROMPTS) - 1


def test_shipped_model_is_the_default_and_small():
    assert default_model() == str(SHIPPED_MODEL)
    files = [p for p in SHIPPED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 32 * 2**20  # fp32 weights: 26 MB
    assert all(p.suffix != ".bin" for p in files)  # safetensors only
    assert (SHIPPED_MODEL / "README.md").is_file()  # the model card


@pytest.fixture(scope="module")
def shipped():
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import RuntimeOptions

    return Generator.load(None, RuntimeOptions(device="cpu"))


def test_shipped_model_records_its_defaults(shipped):
    d = shipped.defaults
    assert (d.height, d.width) == (64, 64)
    assert d.scheduler == "dpm++2m" and d.num_inference_steps == 20
    # guidance on the noisy steps only, but still on the first steps of an img2img edit at strength 0.6 (t = 599)
    assert 0 < d.guidance_cutoff < 0.6


def test_shipped_model_follows_prompts(shipped):
    from ldm_pipeline.settings import Job

    jobs = [Job(p, seed=s, index=i) for i, (p, s) in enumerate(PROMPTS)]
    layout_right, all_right, seen = [], [], []
    for r in shipped.generate(jobs):
        pred, want = classify(r.image), parse_prompt(r.job.prompt)
        seen.append((r.job.prompt, pred.colour, pred.shape, pred.background, pred.position, pred.reason))
        layout_right.append(pred.found and (pred.colour, pred.background) == (want.colour, want.background)
                            and (want.position is None or pred.position == want.position))
        all_right.append(layout_right[-1] and pred.shape == want.shape)
    assert sum(layout_right) >= MIN_LAYOUT_RIGHT, seen
    assert sum(all_right) >= MIN_ALL_RIGHT, seen


def test_bare_txt2img_uses_the_shipped_model(tmp_path: Path):
    r = run_cli("txt2img", "an orange triangle on a blue background", "--seed", "5", "--outdir", str(tmp_path), "-q",
                env={"LDM_MODEL": ""})
    assert r.returncode == 0, r.stderr
    (png,) = tmp_path.glob("*.png")
    pred = classify(Image.open(png))
    assert (pred.colour, pred.shape, pred.background) == ("orange", "triangle", "blue"), pred


def test_plain_diffusers_runs_it_with_default_arguments_and_matches_ldm(shipped):
    # fp16 weights made from_pretrained(folder) fail on a CPU: "mat1 and mat2 must have the same dtype"
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_MODEL))
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    # the README's recipe for `ldm txt2img PROMPT --seed 0 --guidance-cutoff 0` (plain diffusers has no cut-off)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    prompt = "a red circle on a blue background"
    plain = pipe(prompt, num_inference_steps=20, guidance_scale=4.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    ours = shipped.txt2img(prompt, seed=0, guidance_cutoff=0)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(ours))


def test_model_shapes_names_the_shipped_model(tmp_path: Path):
    from ldm_pipeline.cli import main as ldm_main

    assert ldm_main(["txt2img", "a red circle on a blue background", "--model", "shapes", "--seed", "0", "-q",
                     "--outdir", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert "Model: shapes" in Image.open(png).info["parameters"]
    pred = classify(Image.open(png))
    assert (pred.colour, pred.shape, pred.background) == ("red", "circle", "blue"), pred  # not random weights
