"""`--fast`: which speed-ups each device gets, that images stay close to the normal path, and that a fast image
records and replays as such. The compiled path itself (tens of seconds of compilation on CPU) is the slow tier."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline import fast
from ldm_pipeline.cli import main as ldm_main
from ldm_pipeline.generator import ImageGenerator
from ldm_pipeline.settings import Job, RuntimeOptions

PROMPT = "a red circle on a blue background"


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture
def no_compile(monkeypatch):
    """The fast plan without torch.compile: everything else of --fast, in well under a second."""
    real = fast.plan_for
    monkeypatch.setattr(fast, "plan_for", lambda *a, **kw: dataclasses.replace(real(*a, **kw), compile=False))
    import ldm_pipeline.generator as generator_module

    monkeypatch.setattr(generator_module, "plan_for", fast.plan_for)


def test_each_device_gets_its_plan(monkeypatch):
    cuda = fast.plan_for("cuda:1")
    assert (cuda.dtype, cuda.fuse_qkv, cuda.channels_last, cuda.compile, cuda.compile_mode) == \
        ("fp16", True, True, True, "max-autotune")
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
    cpu = fast.plan_for("cpu", unet_params=860_000_000)  # SD 1.5's UNet: compute-bound
    assert (cpu.dtype, cpu.fuse_qkv, cpu.channels_last, cpu.compile) == ("bf16", False, True, False)
    small = fast.plan_for("cpu", unet_params=5_000_000)  # the shipped model: overhead-bound
    assert (small.dtype, small.fuse_qkv, small.channels_last, small.compile) == ("fp32", False, False, True)
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: False)  # emulated bf16 would be slower than fp32
    assert fast.plan_for("cpu", unet_params=860_000_000).dtype == "fp32"
    assert fast.plan_for("cpu", "fp16").dtype == "fp16" and fast.plan_for("cuda", "bf16").dtype == "bf16"
    assert not fast.plan_for("mps").compile
    assert "torch.compile(max-autotune)" in cuda.describe() and cuda.as_record()["dtype"] == "fp16"


def test_fast_image_is_close_to_the_normal_one_and_records_it(tiny_model, tmp_path, no_compile, monkeypatch):
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)  # the same plan on every CPU,
    monkeypatch.setattr(fast, "CPU_BIG_UNET_PARAMS", 0)  # as if the tiny model were SD-size: bf16
    out = tmp_path / "o"
    args = ["txt2img", PROMPT, "--model", str(tiny_model), "--seed", "3", "--steps", "6", "--outdir", str(out), "-q"]
    assert ldm_main(args) == 0
    assert ldm_main([*args, "--fast"]) == 0
    normal, quick = out / "00000-3.png", out / "00001-3.png"
    rec = json.loads(Image.open(quick).info["ldm_pipeline"])
    assert rec["fast"] is True and rec["dtype"] == "bf16"  # --fast chose the precision
    assert "fast" not in json.loads(Image.open(normal).info["ldm_pipeline"])  # normal records stay as they were
    assert 30 <= psnr(Image.open(normal), Image.open(quick)) < math.inf  # close, though not the same pixels
    # replay turns --fast back on by itself, bit for bit
    assert ldm_main(["txt2img", "--replay", str(quick), "--outdir", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(quick)), np.asarray(Image.open(out / "00002-3.png")))


def test_dtype_overrides_the_fast_precision_and_the_api_matches_the_cli(tiny_model, no_compile, monkeypatch):
    monkeypatch.setattr(fast, "CPU_BIG_UNET_PARAMS", 0)  # the SD-size plan: bf16 and channels-last
    g = ImageGenerator.load(str(tiny_model), RuntimeOptions(device="cpu", fast=True, dtype="fp32"))
    assert g.options.dtype == "fp32" and g.pipe.unet.dtype == torch.float32 and g.fast_plan.channels_last
    assert g.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    plain = ImageGenerator.load(str(tiny_model), RuntimeOptions(device="cpu", dtype="auto"))
    assert plain.options.dtype == "fp32" and plain.fast_plan is None
    job = Job(PROMPT, seed=5, num_inference_steps=4)
    a, b = next(g.generate([job])).image, next(plain.generate([job])).image
    assert psnr(a, b) >= 40  # fp32 with channels-last: the same sums in another order


def test_replaying_a_fast_image_without_fast_warns(tiny_model, tmp_path, no_compile, capsys):
    out = tmp_path / "o"
    assert ldm_main(["txt2img", PROMPT, "--model", str(tiny_model), "--seed", "1", "--steps", "2", "--fast",
                     "--outdir", str(out)]) == 0
    assert "--fast: fp32" in capsys.readouterr().err  # what --fast turned on is said once
    from ldm_pipeline.replay import read_record, replay_warnings

    plain = ImageGenerator.load(str(tiny_model), RuntimeOptions(device="cpu"))
    warnings = replay_warnings(read_record(out / "00000-1.png"), plain)
    assert any("made with --fast and is replayed without it" in w for w in warnings), warnings


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("gcc"), reason="torch.compile on CPU needs a C compiler")
def test_compiled_fast_path_runs_close_and_replays_exactly(tiny_model, tmp_path):
    out = tmp_path / "o"
    args = ["txt2img", PROMPT, "--model", str(tiny_model), "--seed", "7", "--steps", "4", "--num-images", "2",
            "--outdir", str(out), "-q"]
    assert ldm_main(args) == 0
    assert ldm_main([*args, "--fast"]) == 0
    for i in range(2):
        assert psnr(Image.open(out / f"0000{i}-{7 + i}.png"), Image.open(out / f"0000{2 + i}-{7 + i}.png")) >= 30
    assert ldm_main(["txt2img", "--replay", str(out / "00002-7.png"), "--outdir", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "00002-7.png")), np.asarray(Image.open(out / "00004-7.png")))


def test_outputs_of_a_cuda_graph_unet_reach_the_pipeline_as_copies():
    # CUDA graphs overwrite their outputs at the next replay; PNDM keeps a raw output across steps
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    t = torch.ones(2)
    (copied,) = fast._copy_outputs(None, (), (t,))
    wrapped = fast._copy_outputs(None, (), UNet2DConditionOutput(sample=t))
    t.zero_()
    assert copied.tolist() == [1.0, 1.0] and wrapped.sample.tolist() == [1.0, 1.0]
