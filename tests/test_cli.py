"""The real commands: outputs, metadata, replay, error paths (one line, exit 2, no traceback)."""

import json
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ldm_pipeline.cli import main as ldm_main
from tests.conftest import run_cli


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    r = run_cli("--help")
    elapsed = time.perf_counter() - t
    assert r.returncode == 0 and "txt2img" in r.stdout and "img2img" in r.stdout and "init-model" in r.stdout
    assert elapsed < 3  # no heavy imports for help (typically ~0.1 s)
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
    # numbering continues, nothing is overwritten
    r = run_cli("txt2img", "a red circle", "--model", str(tiny_model), "--seed", "5", "--steps", "3",
                "--outdir", str(out), "-q")
    assert r.returncode == 0
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
                     "-q", "--clip-skip", "2", "--guidance-rescale", "0.3"]) == 0
    first = out / "00000-77.png"
    assert ldm_main(["txt2img", "--replay", str(first), "--outdir", str(out), "-q"]) == 0
    replayed = out / "00001-77.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(replayed)))
    rec = json.loads(Image.open(replayed).info["ldm_pipeline"])
    assert rec["clip_skip"] == 2 and rec["negative_prompt"] == "red" and rec["guidance_rescale"] == 0.3
    assert "Clip skip: 2" in Image.open(first).info["parameters"]


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
    (["txt2img", "x", "--model", "{model}", "--height", "66"], "not a positive multiple of 4"),
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
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    return {"tmp": str(tmp_path), "model": str(tiny_model)}


@pytest.mark.parametrize("argv, message", ERROR_CASES, ids=[" ".join(a)[:40] for a, _ in ERROR_CASES])
def test_user_errors_one_line_exit_2(argv, message, error_env, capsys, monkeypatch):
    monkeypatch.chdir(error_env["tmp"])
    argv = [a.format(**error_env) for a in argv]
    with pytest.raises(SystemExit) if any(a == "nope" for a in argv) else _nullcontext() as exc:
        rc = ldm_main(argv)
    if exc is not None and getattr(exc, "value", None) is not None:
        rc = exc.value.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ldm")]
    assert len(lines) == 1


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


def test_errors_in_subprocess_have_no_traceback(tmp_path):
    r = run_cli("txt2img", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ldm txt2img: error: model not found")
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = run_cli("txt2img", "x", "--model", str(tmp_path / "m.bin"))
    assert r.returncode == 2


def test_no_model_and_no_default_says_pass_one(tmp_path, monkeypatch, capsys):
    import ldm_pipeline.models as models

    monkeypatch.setattr(models, "default_model", lambda: None)
    assert ldm_main(["txt2img", "x", "--outdir", str(tmp_path)]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_interrupt_keeps_finished_images(tiny_model, tmp_path, monkeypatch, capsys):
    import ldm_pipeline.pipeline as pl

    calls = {"n": 0}
    orig = pl.Generator.run_batch

    def flaky(self, batch, init_images=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, batch, init_images)

    monkeypatch.setattr(pl.Generator, "run_batch", flaky)
    rc = ldm_main(["txt2img", "x", "--model", str(tiny_model), "--num-images", "5", "--steps", "2", "--seed", "0",
                   "--outdir", str(tmp_path), "-q"])
    assert rc == 130
    assert pngs(tmp_path) == ["00000-0.png", "00001-1.png"]
    assert not list(tmp_path.glob(".*tmp"))  # no half-written files left
    assert "2 finished image(s) kept" in capsys.readouterr().err


def test_init_model_cli(tmp_path):
    r = run_cli("init-model", "--config", "tiny", "--output", str(tmp_path / "m"), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    r = run_cli("init-model", "--config", "tiny", "--output", str(tmp_path / "m"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("init-model", "--config", "nope", "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "config 'nope' not found" in r.stderr
