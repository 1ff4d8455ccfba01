"""The real commands: outputs, metadata, replay, error paths (one line, exit 2, no traceback)."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.cli import main as ldm_main
from tests.conftest import run_cli


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_help_lists_commands():
    r = run_cli("--help")  # that it imports nothing heavy: the next test
    assert r.returncode == 0 and "txt2img" in r.stdout and "img2img" in r.stdout and "init-model" in r.stdout
    r = run_cli("txt2img", "--help")
    assert r.returncode == 0 and "--scheduler" in r.stdout and "dpm++2m-karras" in r.stdout


def test_heavy_modules_not_imported_for_help_and_arg_errors():
    code = (
        "import sys; from ldm_pipeline.cli import main; rc = main(['txt2img', '--steps', '0', 'x']);"
        "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["2", "False", "False"]


def test_txt2img_end_to_end_subprocess(tiny_model, tmp_path):
    out = tmp_path / "out"
    r = run_cli("txt2img", "a red circle", "--model", str(tiny_model), "--seed", "5", "--steps", "3",
                "--num-images", "2", "--outdir", str(out), "--grid", "-q")
    assert r.returncode == 0, r.stderr
    assert pngs(out) == ["00000-5.png", "00001-6.png", "grid-00000.png"]
    im = Image.open(out / "00000-5.png")
    params = im.info["parameters"]
    assert params.startswith("a red circle\n")
    assert "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: " in params
    rec = json.loads(im.info["ldm_pipeline"])
    assert rec["seed"] == 5 and rec["scheduler"] == "ddim" and rec["model"]["path"] == str(tiny_model)
    assert rec["versions"]["diffusers"] and rec["dtype"] == "fp32" and rec["device_type"] == "cpu"
    # numbering continues, nothing is overwritten (in-process: the subprocess above already proved the console script)
    assert ldm_main(["txt2img", "a red circle", "--model", str(tiny_model), "--seed", "5", "--steps", "3",
                     "--outdir", str(out), "-q"]) == 0
    assert "00002-5.png" in pngs(out)
    assert np.array_equal(np.asarray(Image.open(out / "00002-5.png")), np.asarray(Image.open(out / "00000-5.png")))
    # python -m works too
    r2 = __import__("subprocess").run([sys.executable, "-m", "ldm_pipeline", "--version"], capture_output=True, text=True)
    assert r2.returncode == 0 and "ldm_pipeline" in r2.stdout


def test_replay_is_bit_exact(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text(json.dumps({"prompt": "a (blue:1.2) square", "negative_prompt": "red", "seed": 77,
                                       "scheduler": "euler-a", "steps": 4, "guidance_scale": 5}) + "\n")
    assert ldm_main(["txt2img", "--from-file", str(prompt_file), "--model", str(tiny_model), "--outdir", str(out),
                     "-q", "--clip-skip", "2", "--guidance-rescale", "0.3", "--guidance-cutoff", "0.4"]) == 0
    first = out / "00000-77.png"
    assert ldm_main(["txt2img", "--replay", str(first), "--outdir", str(out), "-q"]) == 0
    replayed = out / "00001-77.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(replayed)))
    rec = json.loads(Image.open(replayed).info["ldm_pipeline"])
    assert rec["clip_skip"] == 2 and rec["negative_prompt"] == "red" and rec["guidance_rescale"] == 0.3
    assert rec["guidance_cutoff"] == 0.4
    assert "Clip skip: 2" in Image.open(first).info["parameters"]
    assert "CFG cutoff: 0.4" in Image.open(first).info["parameters"]


def test_replay_of_a_record_from_before_guidance_cutoff_guides_every_step(generator):
    from ldm_pipeline.replay import jobs_from_record
    from ldm_pipeline.settings import Job

    rec = next(generator.generate([Job("x", seed=1, num_inference_steps=2, guidance_cutoff=0.5)])).record
    assert jobs_from_record(rec)[0].guidance_cutoff == 0.5
    del rec["guidance_cutoff"]  # images made before the option: not the model's default now, but 0 (every step)
    assert jobs_from_record(rec)[0].guidance_cutoff == 0.0


def test_img2img_below_the_guidance_cutoff_says_no_step_is_guided(tiny_model, tmp_path, capsys):
    Image.new("RGB", (64, 64), (40, 80, 220)).save(tmp_path / "in.png")
    args = ["img2img", "a red square", "--init-image", str(tmp_path / "in.png"), "--model", str(tiny_model), "-q",
            "--seed", "1", "--steps", "10", "--guidance-scale", "5", "--outdir", str(tmp_path / "o")]
    assert ldm_main(args + ["--strength", "0.3", "--guidance-cutoff", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "the first step (timestep 201) is already below the guidance cut-off 0.5: no step is guided" in err, err
    assert ldm_main(args + ["--strength", "0.8", "--guidance-cutoff", "0.5"]) == 0
    assert "no step is guided" not in capsys.readouterr().err


def test_img2img_end_to_end_and_replay(tiny_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate([(64, 64), (70, 50)]):
        Image.new("RGB", size, (40 * i, 80, 220)).save(src / f"in{i}.png")
    out = tmp_path / "out"
    assert ldm_main(["img2img", "a green circle", "--init-image", str(src), "--model", str(tiny_model),
                     "--strength", "0.6", "--seed", "1", "--steps", "5", "--outdir", str(out), "-q"]) == 0
    files = pngs(out)
    assert files == ["00000-1.png", "00001-2.png"]
    second = Image.open(out / files[1])
    assert second.size == (68, 48)  # 70x50 cropped down to multiples of the VAE factor 4
    assert "Denoising strength: 0.6" in second.info["parameters"]
    rec = json.loads(second.info["ldm_pipeline"])
    assert rec["init_image_sha256"] and rec["strength"] == 0.6 and rec["mode"] == "img2img"
    assert ldm_main(["img2img", "--replay", str(out / files[1]), "--outdir", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(second), np.asarray(Image.open(out / "00002-2.png")))
    # replaying with the wrong command is explained
    assert ldm_main(["txt2img", "--replay", str(out / files[0]), "--outdir", str(out)]) == 2


def test_glob_init_images(tiny_model, tmp_path):
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(tmp_path / f"a{i}.jpg")
    out = tmp_path / "out"
    assert ldm_main(["img2img", "x", "--init-image", str(tmp_path / "a*.jpg"), "--model", str(tiny_model),
                     "--steps", "2", "--seed", "0", "--outdir", str(out), "-q", "--width", "32", "--height", "32"]) == 0
    assert len(pngs(out)) == 2 and Image.open(out / "00000-0.png").size == (32, 32)


ERROR_CASES = [
    (["txt2img"], "no prompt"),
    (["txt2img", "x", "--steps", "0"], "--steps must be at least 1"),
    (["txt2img", "x", "--scheduler", "nope"], "invalid choice"),
    (["txt2img", "x", "--height", "-8"], "--height must be positive"),
    (["txt2img", "x", "--num-images", "0"], "--num-images"),
    (["img2img", "x", "--init-image", "a.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["img2img", "x", "--init-image", "a.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["img2img", "x"], "needs --init-image"),
    (["txt2img", "x", "--model", "/nonexistent/model"], "model not found"),
    (["txt2img", "x", "--model", "{tmp}/model.ckpt"], "pickle"),
    (["txt2img", "x", "--model", "someorg/some-model"], "not available locally"),
    (["txt2img", "x", "--model", "{tmp}"], "not a diffusers model folder"),
    (["txt2img", "--from-file", "{tmp}/empty.txt", "--model", "{model}"], "has no prompts"),
    (["txt2img", "--from-file", "{tmp}/bad.jsonl", "--model", "{model}"], "line 2: not valid JSON"),
    (["txt2img", "--from-file", "{tmp}/missing.txt", "--model", "{model}"], "prompt file not found"),
    (["img2img", "x", "--init-image", "{tmp}/nope.png", "--model", "{model}"], "init image not found"),
    (["img2img", "x", "--init-image", "{tmp}/garbage.png", "--model", "{model}", "--seed", "0"], "cannot read init image"),
    (["txt2img", "x", "--model", "{model}", "--height", "66"], "--height 66 is not a multiple of 8"),
    # a multiple of the tiny VAE's factor 4, not of diffusers' 8: a ValueError traceback from diffusers before
    (["txt2img", "x", "--model", "{model}", "--width", "68"], "--width 68 is not a multiple of 8 (txt2img needs"),
    (["img2img", "x", "--init-image", "{tmp}/plain.png", "--model", "{model}", "--height", "66"],
     "--height 66 is not a multiple of 4"),
    (["img2img", "x", "--init-image", "{tmp}/plain.png", "--model", "{model}", "--strength", "0.04"],
     "strength 0.04 × 20 steps leaves no denoising step"),
    (["img2img", "x", "--init-image", "a.png", "--steps", "10", "--strength", "0.05"], "use --strength 0.1 or more"),
    (["txt2img", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["txt2img", "x", "--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1]"),
    (["txt2img", "x", "--guidance-cutoff", "1.5"], "--guidance-cutoff must be in [0, 1]"),
    (["txt2img", "--replay", "{tmp}/made.png", "--guidance-cutoff", "0.5"], "drop --guidance-cutoff"),
    (["txt2img", "x", "--eta", "-1"], "--eta must be in [0, 1]"),
    (["txt2img", "x", "--eta", "1.5", "--scheduler", "ddim"], "--eta must be in [0, 1]"),  # NaN past 1
    (["txt2img", "x", "--clip-skip", "0"], "--clip-skip must be at least 1"),
    (["txt2img", "x", "--eta", "0.5", "--scheduler", "euler"], "--eta applies to the ddim scheduler only"),
    (["txt2img", "x", "--eta", "0.5", "--scheduler", "ddpm"], "--eta applies to the ddim scheduler only, not ddpm"),
    (["txt2img", "x", "--seed", "-2"], "--seed must be -1 (random) or 0..18446744073709551615"),
    (["txt2img", "x", "--seed", "18446744073709551616"], "--seed must be -1"),
    (["txt2img", "--from-file", "{tmp}/rows.jsonl"], "rows.jsonl line 2: num_images must be at least 1"),
    (["txt2img", "--replay", "{tmp}/made.png", "--steps", "5", "--seed", "1"], "drop --steps, --seed"),
    (["img2img", "--replay", "{tmp}/made.png", "--strength", "0.5"], "drop --strength"),
    (["txt2img", "x", "--model", "{model}", "--device", "cuda:1"], "--device cuda:1: no CUDA GPU"),
    (["txt2img", "x", "--model", "{model}", "--device", "mps"], "Apple MPS is not available"),
    (["txt2img", "x", "--model", "{model}", "--outdir", "{tmp}/file.txt/sub"], "cannot create output folder"),
    (["txt2img", "--replay", "{tmp}/garbage.png"], "cannot read replay image"),
    (["txt2img", "--replay", "{tmp}/plain.png"], "no ldm_pipeline metadata"),
    (["txt2img", "x", "--model", "{model}", "--device", "cuda"], "no CUDA GPU"),
]


@pytest.fixture()
def error_env(tmp_path, tiny_model):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    (tmp_path / "garbage.png").write_bytes(b"garbage")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "num_images": 0}\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    from ldm_pipeline.metadata import png_info

    Image.new("RGB", (8, 8)).save(tmp_path / "made.png", pnginfo=png_info(
        {"prompt": "a", "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 1, "width": 8, "height": 8,
         "scheduler": "ddim", "model": {"hash": "x", "name": "m"}, "mode": "txt2img"}))
    return {"tmp": str(tmp_path), "model": str(tiny_model)}


@pytest.mark.parametrize("argv, message", ERROR_CASES, ids=[" ".join(a)[:40] for a, _ in ERROR_CASES])
def test_user_errors_one_line_exit_2(argv, message, error_env, capsys, monkeypatch):
    import torch

    monkeypatch.chdir(error_env["tmp"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the device cases, on any machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    argv = [a.format(**error_env) for a in argv]
    with pytest.raises(SystemExit) if any(a == "nope" for a in argv) else _nullcontext() as exc:
        rc = ldm_main(argv)
    if exc is not None and getattr(exc, "value", None) is not None:
        rc = exc.value.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    prog = f"ldm {argv[0]}"
    assert lines[-1].startswith(f"{prog}: error: ") and message in lines[-1], err
    if exc is None:  # ours: nothing but the one line (no progress bar, warning or library chatter)
        assert len(lines) == 1, err
    else:  # argparse's own: its usage lines, then the error line
        assert all(ln.startswith(("usage:", " ")) for ln in lines[:-1]), err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_unwritable_outdir(tiny_model, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert ldm_main(["txt2img", "x", "--model", str(tiny_model), "--outdir", str(ro)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_errors_in_subprocess_have_no_traceback(tmp_path, capsys):
    r = run_cli("txt2img", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ldm txt2img: error: model not found")
    # the same exit path in-process (a subprocess each adds seconds of imports and nothing else)
    assert ldm_main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    (tmp_path / "m.bin").write_bytes(b"x")
    assert ldm_main(["txt2img", "x", "--model", str(tmp_path / "m.bin")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--allow-pickle" in err


def test_no_model_and_no_default_says_pass_one(tmp_path, monkeypatch, capsys):
    import ldm_pipeline.models as models

    monkeypatch.setattr(models, "default_model", lambda: None)
    assert ldm_main(["txt2img", "x", "--outdir", str(tmp_path)]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_interrupt_keeps_finished_images(tiny_model, tmp_path, monkeypatch, capsys):
    import ldm_pipeline.generator as pl

    calls = {"n": 0}
    orig = pl.ImageGenerator.run_batch

    def flaky(self, batch, init_images=None, on_step=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, batch, init_images, on_step)

    monkeypatch.setattr(pl.ImageGenerator, "run_batch", flaky)
    rc = ldm_main(["txt2img", "x", "--model", str(tiny_model), "--num-images", "5", "--steps", "2", "--seed", "0",
                   "--outdir", str(tmp_path), "-q"])
    assert rc == 130
    assert pngs(tmp_path) == ["00000-0.png", "00001-1.png"]
    assert not list(tmp_path.glob(".*.tmp*"))  # no half-written files left
    assert "2 finished image(s) kept" in capsys.readouterr().err


def test_init_model_cli(tmp_path, capsys):
    r = run_cli("init-model", "--config", "tiny", "--output", str(tmp_path / "m"), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    assert ldm_main(["init-model", "--config", "tiny", "--output", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert ldm_main(["init-model", "--config", "nope", "--output", str(tmp_path / "x")]) == 2
    assert "config 'nope' not found" in capsys.readouterr().err


def test_replay_of_a_batched_image_regenerates_its_batch(tiny_model, tmp_path):
    out = tmp_path / "o"
    assert ldm_main(["txt2img", "a red circle", "a blue square, big", "--model", str(tiny_model), "--seed", "3",
                     "--steps", "3", "--num-images", "2", "--batch-size", "4", "--scheduler", "euler-a",
                     "--outdir", str(out), "-q"]) == 0
    third = out / "00002-5.png"
    assert "Batch size: 4, Batch pos: 2" in Image.open(third).info["parameters"]
    assert ldm_main(["txt2img", "--replay", str(third), "--outdir", str(out), "-q"]) == 0
    assert pngs(out) == ["00000-3.png", "00001-4.png", "00002-5.png", "00003-6.png", "00004-5.png"]  # just the one
    # bit for bit, although the image alone (batch size 1) rounds differently from the batched one
    assert np.array_equal(np.asarray(Image.open(third)), np.asarray(Image.open(out / "00004-5.png")))
    assert json.loads(Image.open(out / "00004-5.png").info["ldm_pipeline"])["batch"]["position"] == 2


def test_replay_records_absolute_paths_and_runs_from_elsewhere(tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(work / "in.png")
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_model, work)
    assert ldm_main(["img2img", "x", "--init-image", "in.png", "--model", model, "--seed", "1", "--steps", "2",
                     "--outdir", "out", "-q"]) == 0
    made = work / "out" / "00000-1.png"
    rec = json.loads(Image.open(made).info["ldm_pipeline"])
    assert rec["model"]["path"] == str(tiny_model.resolve()) and rec["init_image"] == str((work / "in.png").resolve())
    monkeypatch.chdir(tmp_path)
    assert ldm_main(["img2img", "--replay", str(made), "--outdir", "again", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "again" / "00000-1.png")))


def test_replay_warns_when_the_device_type_differs(tiny_model, tmp_path, capsys):
    from ldm_pipeline.metadata import png_info

    assert ldm_main(["txt2img", "x", "--model", str(tiny_model), "--seed", "2", "--steps", "2", "--outdir",
                     str(tmp_path), "-q"]) == 0
    made = tmp_path / "00000-2.png"
    im = Image.open(made)
    rec = json.loads(im.info["ldm_pipeline"])
    rec["device_type"] = "cuda"
    im.save(tmp_path / "from-gpu.png", pnginfo=png_info(rec))
    capsys.readouterr()
    assert ldm_main(["txt2img", "--replay", str(tmp_path / "from-gpu.png"), "--outdir", str(tmp_path), "-q"]) == 0
    assert "warning: the image was made on cuda and is replayed on cpu: pixels may differ" in capsys.readouterr().err
    assert ldm_main(["txt2img", "--replay", str(made), "--outdir", str(tmp_path), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_replay_keeps_a_recorded_lora_scale_of_zero():
    from ldm_pipeline.cli.txt2img import _lora_scale, build_parser

    args = build_parser().parse_args(["--replay", "x.png"])
    assert _lora_scale(args, {"lora_scale": 0.0}) == 0.0  # was `or 1.0`: a LoRA recorded as off came back on
    assert _lora_scale(args, {"lora_scale": None}) == 1.0 and _lora_scale(args, None) == 1.0
    args = build_parser().parse_args(["--replay", "x.png", "--lora-scale", "0.5"])
    assert _lora_scale(args, {"lora_scale": 0.0}) == 0.5


def test_seed_minus_one_is_random_and_seeds_wrap_at_2_64(tiny_model, tmp_path):
    out = tmp_path / "o"
    assert ldm_main(["txt2img", "x", "--model", str(tiny_model), "--seed", "-1", "--steps", "1", "--outdir",
                     str(out), "-q"]) == 0
    (made,) = out.glob("*.png")
    assert json.loads(Image.open(made).info["ldm_pipeline"])["seed"] == int(made.stem.split("-")[1]) >= 0
    assert ldm_main(["txt2img", "x", "--model", str(tiny_model), "--seed", str(2**64 - 1), "--num-images", "2",
                     "--steps", "1", "--outdir", str(out), "-q"]) == 0
    assert {"00001-18446744073709551615.png", "00002-0.png"} <= set(pngs(out))


def test_nan_image_exits_2_with_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel

    orig = UNet2DConditionModel.forward

    def nan_forward(self, *a, **k):
        out = orig(self, *a, **k)
        out[0][:] = float("nan")
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", nan_forward)
    out = tmp_path / "o"
    rc = ldm_main(["txt2img", "a cat", "--model", str(tiny_model), "--steps", "2", "--seed", "3", "--outdir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "invalid value" not in err, err
    assert err.strip().splitlines()[-1] == (
        "ldm txt2img: error: the image for seed 3 came out as NaN/inf (scheduler ddim, 2 steps, CFG 7.5): nothing was "
        "saved for it; try another --scheduler or --steps, or --dtype fp32")
    assert list(out.iterdir()) == []


def test_progress_counts_denoising_steps(tiny_model, tmp_path, capsys):
    assert ldm_main(["txt2img", "a cat", "--model", str(tiny_model), "--steps", "3", "--num-images", "2",
                     "--outdir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "6/6" in err and "step" in err and "image 2/2" in err, err  # 2 images x 3 steps, not 0/1 for minutes


def test_a_lora_used_is_in_the_a1111_text(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldm_pipeline.models import load_pipeline

    pipe, _ = load_pipeline(str(tiny_model))
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "inkstyle", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    weights = tmp_path / "inkstyle" / "pytorch_lora_weights.safetensors"
    assert ldm_main(["txt2img", "a cat", "--model", str(tiny_model), "--steps", "2", "--seed", "1", "-q",
                     "--lora", str(weights), "--lora-scale", "0.7", "--outdir", str(tmp_path / "o")]) == 0
    (png,) = (tmp_path / "o").glob("*.png")
    params = Image.open(png).info["parameters"]
    data = weights.read_bytes()
    autov3 = __import__("hashlib").sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert params.splitlines()[0] == "a cat <lora:inkstyle:0.7>"  # A1111's tag for a LoRA in the prompt
    assert f'Lora hashes: "inkstyle: {autov3}"' in params
    rec = json.loads(Image.open(png).info["ldm_pipeline"])
    assert rec["prompt"] == "a cat"  # the tag is A1111's spelling, not part of what was encoded
    assert ldm_main(["txt2img", "--replay", str(png), "--outdir", str(tmp_path / "o"), "-q"]) == 0
    first, again = sorted((tmp_path / "o").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_replay_from_python_gives_the_same_pixels(tiny_model, tmp_path):
    from ldm_pipeline import replay_image

    assert ldm_main(["txt2img", "a cat", "a dog", "--model", str(tiny_model), "--steps", "2", "--seed", "4",
                     "--batch-size", "2", "--outdir", str(tmp_path), "-q"]) == 0
    second = tmp_path / "00001-5.png"  # made in a batch of two: replay rebuilds the batch
    again = replay_image(second, device="cpu")
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(again))
