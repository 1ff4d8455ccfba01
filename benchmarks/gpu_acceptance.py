"""GPU acceptance: one command that checks, on one GPU, what the CPU test suite cannot, and records it.

  python benchmarks/gpu_acceptance.py                 # CUDA: sd15 architecture (random weights), 512x512
  python benchmarks/gpu_acceptance.py --device cpu    # the tiny config at 64x64, well under a minute: a dry run

Checks (each → true/false with a one-line detail; null = does not apply to this device):
  txt2img/img2img in fp16 and bf16 at the model's size; --replay bit-exact; --cpu-offload; --vae-tiling;
  --fast against plain diffusers (images/s ratio, PSNR); fp16 mixed-precision training with gradient
  checkpointing, SIGKILLed after a checkpoint and resumed with --resume latest to the same weights as an
  uninterrupted run; --cache-latents training; LoRA training then txt2img with the LoRA; FSDP with one process.
  SDXL: the sdxl architecture (random weights) generating at 1024x1024 in fp16, and one fine-tuning step and one
  LoRA step of its recipes (configs/train/sdxl_*.yaml) at 1024 px; on CPU, tiny_sdxl at 64 px.
Writes benchmarks/results/gpu-<date>.json (device, checks, fast_speedup_sd15_512, and the usual machine/versions).
The CPU run skips what needs CUDA and compiles nothing (bench_fast.py measures torch.compile on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work: the resume check's deterministic run

import results  # noqa: E402  (benchmarks/results.py)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


class Acceptance:
    """Runs named checks, keeps going after a failure, and collects name → {ok, detail, seconds}."""

    def __init__(self) -> None:
        self.checks: dict[str, dict] = {}

    def run(self, name: str, fn: Callable[[], tuple[bool | None, str]]) -> None:
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a check that crashes fails; the rest still run
            ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        ok = None if ok is None else bool(ok)  # numpy's bool_ is not JSON
        self.checks[name] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - t, 2)}
        mark = {True: "PASS", False: "FAIL", None: "skip"}[ok]
        print(f"[{mark}] {name}: {detail} ({self.checks[name]['seconds']}s)", flush=True)


def ldm(*args: str) -> int:
    """`ldm ARGS` in this process (the CLI's own code path, without a new interpreter's imports)."""
    from ldm_pipeline.cli import main

    return main([str(a) for a in args])


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def only_png(folder: Path) -> Path:
    pngs = sorted(p for p in folder.glob("*.png") if not p.name.startswith("grid"))
    assert pngs, f"no image written in {folder}"
    return pngs[-1]


def weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of every tensor file under a saved model folder's unet/ and text_encoder/ (byte-equal weights)."""
    import hashlib

    from safetensors.torch import load_file

    out = {}
    for comp in ("unet", "text_encoder"):
        for f in sorted((folder / comp).glob("*.safetensors")):
            h = hashlib.sha256()
            for k, v in sorted(load_file(f).items()):
                h.update(k.encode())
                h.update(v.float().contiguous().numpy().tobytes())
            out[f"{comp}/{f.name}"] = h.hexdigest()
    return out


def generation_checks(acc: Acceptance, model: Path, work: Path, device: str, size: int, cuda: bool) -> None:
    common = ["--model", model, "--device", device, "--steps", "8", "--height", size, "--width", size, "-q"]
    made: dict[str, Path] = {}

    def txt2img(dtype: str) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            out = work / f"t2i-{dtype}"
            rc = ldm("txt2img", PROMPT, *common, "--dtype", dtype, "--seed", "1", "-o", out)
            made[dtype] = only_png(out) if rc == 0 else None
            a = pixels(made[dtype]) if rc == 0 else None
            return rc == 0 and a.std() > 0, f"exit {rc}" + (f", image std {a.std():.1f}" if a is not None else "")
        return check

    def img2img(dtype: str) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            init = made.get(dtype)
            if init is None:
                return False, f"no {dtype} txt2img image to start from"
            out = work / f"i2i-{dtype}"
            rc = ldm("img2img", "a green square", "--init-image", init, *common, "--dtype", dtype, "--seed", "2",
                     "--strength", "0.6", "-o", out)
            return rc == 0, f"exit {rc}"
        return check

    dtypes = ["fp16", "bf16"] if cuda else ["fp32", "bf16"]  # fp16 convolutions on CPU: slow, not a user path
    for dtype in dtypes:
        acc.run(f"txt2img_{dtype}", txt2img(dtype))
        acc.run(f"img2img_{dtype}", img2img(dtype))

    def replay() -> tuple[bool, str]:
        first = made.get(dtypes[0])
        if first is None:
            return False, "no image to replay"
        out = work / "replayed"
        rc = ldm("txt2img", "--replay", first, "--device", device, "-o", out, "-q")
        same = rc == 0 and (pixels(first) == pixels(only_png(out))).all()
        return bool(same), f"exit {rc}, {'bit-exact' if same else 'pixels differ'} ({dtypes[0]}, {device})"

    acc.run("replay_bit_exact", replay)

    def offload() -> tuple[bool | None, str]:
        if not cuda:
            return None, "needs CUDA"
        out = work / "offload"
        rc = ldm("txt2img", PROMPT, *common, "--dtype", "fp16", "--seed", "1", "--cpu-offload", "-o", out)
        if rc != 0:
            return False, f"exit {rc}"
        from bench_fast import psnr

        p = psnr(pixels(made["fp16"]), pixels(only_png(out)))
        return p >= 40, f"PSNR {p:.1f} dB vs the same image without offload"

    acc.run("cpu_offload", offload)

    def tiling() -> tuple[bool, str]:
        out = work / "tiled"
        big = size * 2  # past the VAE's tile size, so tiles are really decoded and blended
        rc = ldm("txt2img", PROMPT, "--model", model, "--device", device, "--steps", "4", "--height", big, "--width",
                 big, "--dtype", dtypes[0], "--vae-tiling", "--seed", "3", "-o", out, "-q")
        a = pixels(only_png(out)) if rc == 0 else None
        ok = rc == 0 and a.shape[:2] == (big, big)
        return ok, f"exit {rc}" + (f", {a.shape[1]}x{a.shape[0]}" if a is not None else "")

    acc.run("vae_tiling", tiling)


def fast_check(acc: Acceptance, model: Path, device: str, size: int, cuda: bool, repeats: int) -> dict:
    """--fast vs plain diffusers on the same folder, seeds and settings (bench_fast.py's variants)."""
    import statistics

    import bench_fast

    found: dict = {}

    def check() -> tuple[bool, str]:
        # the CPU dry run stays under a minute: no compilation (bench_fast.py measures it on CPU)
        args = argparse.Namespace(batch_size=1, steps=20, guidance_scale=7.5, height=size, width=size,
                                  dtype=None, plain_dtype=None, ablate=False, no_compile=not cuda)
        runs, _ = bench_fast.pipeline_variants(args, str(model), device)
        plain, ours = list(runs)
        images, first, times, _ = bench_fast.measure(runs, repeats, device, verbose=False)
        ratio = statistics.median(times[plain]) / statistics.median(times[ours])
        p = bench_fast.psnr(images[ours][0], images[plain][0])
        found.update(ratio=ratio, psnr_db=None if math.isinf(p) else p, first_call_s=first,
                     median_s={n: statistics.median(v) for n, v in times.items()}, times=times)
        text = f"{ratio:.2f}x plain diffusers ({plain}), PSNR {p:.1f} dB, first call {first[ours]:.1f}s"
        if not cuda:  # uncompiled on CPU: the ratio is recorded, not judged
            return p >= 30, text + " (CPU dry run: compilation off)"
        return ratio >= 2.0 and p >= 30, text + " (target 2x, PSNR 30 dB)"

    acc.run("fast_vs_plain", check)
    return found


def train_args(model: Path, data: Path, out: Path, cuda: bool, *extra: str) -> list[str]:
    if cuda:
        base = ["--config", "sd15_finetune", "--resolution", "256", "--batch-size", "1",
                "--gradient-accumulation-steps", "1", "--mixed-precision", "fp16", "data.num_workers=2"]
    else:
        base = ["--config", "tiny_test", "--resolution", "32", "--mixed-precision", "bf16",
                "gradient_checkpointing=true"]
    # checkpoint_pipeline=false: no model folders inside checkpoints (an SD 1.5 one would add ~9 GB to each)
    return ["train", *base, "--model", str(model), "--data", str(data), "--output-dir", str(out), "--validate-every",
            "0", "--report-to", "none", "--no-progress", "--lr-warmup-steps", "0", "checkpoint_pipeline=false",
            *extra]


def training_checks(acc: Acceptance, model: Path, data: Path, work: Path, device: str, cuda: bool) -> None:
    # an SD 1.5 checkpoint (fp32 UNet, EMA, AdamW state) is ~14 GB: few of them, one kept, each run's folder removed
    # once checked, so the GPU machine's disk holds them; after checkpoint-2 the killed run still has steps and a
    # checkpoint to write, so the kill lands mid-run. Deterministic kernels: without them two uninterrupted CUDA runs
    # already differ (flash attention's backward), and the comparison would say nothing about resume
    steps, every = (6, 2) if cuda else (10, 3)
    resume_args = ["--max-steps", str(steps), "--checkpoint-every", str(every), "ema.enabled=true",
                   "checkpoints_total_limit=1", "deterministic=true"]

    def sigkill_resume() -> tuple[bool, str]:
        ref, killed = work / "train-ref", work / "train-killed"
        if ldm(*train_args(model, data, ref, cuda, *resume_args)) != 0:
            return False, "the uninterrupted run failed"
        for old in ref.glob("checkpoint-*"):  # only final/ and final_raw/ are compared: free the disk
            shutil.rmtree(old)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if not cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "ldm_pipeline", *train_args(model, data, killed, cuda, *resume_args)]
        log = open(work / "train-killed.log", "w")  # a file, not a pipe nobody reads while waiting (it could fill)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (killed / f"checkpoint-{every}").is_dir():
            if proc.poll() is not None:
                log.close()
                return False, (f"the run to kill ended first (exit {proc.returncode}): "
                               f"{(work / 'train-killed.log').read_text()[-300:]}")
            if time.time() > deadline:
                proc.kill()
                return False, "no checkpoint within 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        if (killed / "final").exists():
            return False, "the run finished before the kill: inconclusive"
        if ldm(*train_args(model, data, killed, cuda, *resume_args, "--resume", "latest")) != 0:
            return False, "resume failed"
        same = all(weights_digest(ref / f) == weights_digest(killed / f) for f in ("final", "final_raw"))
        shutil.rmtree(ref)
        shutil.rmtree(killed)
        precision = "fp16" if cuda else "bf16"
        return same, (f"{precision} mixed precision, gradient checkpointing, killed after checkpoint-{every}, "
                      f"resumed: final and EMA weights {'equal' if same else 'DIFFER'}")

    acc.run("train_sigkill_resume", sigkill_resume)

    def cached() -> tuple[bool, str]:
        out = work / "train-cached"
        rc = ldm(*train_args(model, data, out, cuda, "--max-steps", "4", "--checkpoint-every", "0", "--cache-latents"))
        m = json.loads((out / "metrics.json").read_text()) if rc == 0 else {}
        losses = [v for _, v in m.get("losses", [])]
        ok = rc == 0 and bool(losses) and all(math.isfinite(v) for v in losses)
        shutil.rmtree(out, ignore_errors=True)
        return ok, f"exit {rc}, {len(losses)} finite losses" if ok else f"exit {rc}, losses {losses}"

    acc.run("train_cached_latents", cached)

    def lora() -> tuple[bool, str]:
        out = work / "train-lora"
        rc = ldm(*train_args(model, data, out, cuda, "--max-steps", "4", "--checkpoint-every", "0", "--lora-rank", "4"))
        if rc != 0:
            return False, f"training exit {rc}"
        files = sorted((out / "final").rglob("*.safetensors"))
        rc2 = ldm("txt2img", PROMPT, "--model", model, "--lora", files[0], "--device", device, "--steps", "4",
                  "--height", "64" if not cuda else "256", "--width", "64" if not cuda else "256", "-o",
                  work / "lora-img", "-q") if files else -1
        shutil.rmtree(out, ignore_errors=True)
        return rc2 == 0, f"adapter {files[0].name if files else 'missing'}, txt2img with it: exit {rc2}"

    acc.run("train_lora", lora)

    def fsdp() -> tuple[bool | None, str]:
        if not cuda:
            return None, "needs CUDA"
        out = work / "train-fsdp"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "ldm_pipeline",
               *train_args(model, data, out, cuda, "--max-steps", "3", "--checkpoint-every", "0",
                           "--mixed-precision", "bf16", "ema.enabled=false", "checkpoint_pipeline=false")]
        r = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                           timeout=400)
        ok = r.returncode == 0 and (out / "final").is_dir()
        shutil.rmtree(out, ignore_errors=True)
        return ok, f"exit {r.returncode}" + ("" if ok else f": {r.stderr.strip()[-300:]}")

    acc.run("train_fsdp_1_process", fsdp)


def sdxl_checks(acc: Acceptance, data: Path, work: Path, device: str, cuda: bool) -> dict:
    """SDXL at full size on CUDA (random weights: what runs, and how fast, does not depend on them), tiny_sdxl on CPU."""
    from ldm_pipeline.models import CONFIG_PREFIX

    model = f"{CONFIG_PREFIX}{'sdxl' if cuda else 'tiny_sdxl'}"
    size = 1024 if cuda else 64
    found: dict = {"model": model, "size": size}

    def generate() -> tuple[bool, str]:
        out = work / "sdxl-t2i"
        dtype = "fp16" if cuda else "fp32"  # fp16: SDXL's VAE decodes in fp32 (force_upcast), or the image is NaN
        t = time.perf_counter()
        rc = ldm("txt2img", PROMPT, "--model", model, "--device", device, "--dtype", dtype, "--steps", "10",
                 "--height", size, "--width", size, "--seed", "1", "-o", out, "-q")
        found["txt2img_s"] = round(time.perf_counter() - t, 2)  # model build (random weights) + 10 steps + decode
        a = pixels(only_png(out)) if rc == 0 else None
        ok = rc == 0 and a.shape[:2] == (size, size) and a.std() > 0
        return ok, (f"exit {rc}" + (f", {a.shape[1]}x{a.shape[0]} {dtype}, image std {a.std():.1f}" if a is not None
                                    else "") + f", {found['txt2img_s']}s with the model build")

    acc.run("sdxl_txt2img", generate)

    def train_step(recipe: str, *extra: str) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            out = work / f"sdxl-{recipe}"
            # bf16 on CPU too: the checks share one process, whose accelerate state keeps its first precision
            precision = ["--mixed-precision", "bf16"] + ([] if cuda else ["data.num_workers=0"])
            t = time.perf_counter()
            rc = ldm("train", "--config", recipe, "--model", model, "--data", data, "--output-dir", out,
                     "--resolution", str(size), "--max-steps", "1", "--lr-warmup-steps", "0", "--validate-every", "0",
                     "--checkpoint-every", "0", "--report-to", "none", "--no-progress", *precision, *extra)
            found[f"{recipe}_step_s"] = round(time.perf_counter() - t, 2)
            m = json.loads((out / "metrics.json").read_text()) if rc == 0 else {}
            losses = [v for _, v in m.get("losses", [])]
            ok = rc == 0 and len(losses) == 1 and math.isfinite(losses[0])
            shutil.rmtree(out, ignore_errors=True)
            return ok, f"exit {rc}, losses {losses}, {found[f'{recipe}_step_s']}s with model build and save"
        return check

    # plain AdamW: bitsandbytes (the recipe's 8-bit AdamW) is an extra the GPU machine may lack
    acc.run("sdxl_finetune_step", train_step("sdxl_finetune", "optimizer=adamw"))
    acc.run("sdxl_lora_step", train_step("sdxl_lora"))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the acceptance run) or cpu (a dry run of the script)")
    p.add_argument("--model", help="default: config:sd15 on CUDA, config:tiny on CPU (random weights)")
    p.add_argument("--fast-repeats", type=int, default=5)
    p.add_argument("--work-dir", help="keep the models, data and images here (default: a temporary folder)")
    results.add_arguments(p)
    args = p.parse_args(argv)
    begun = results.start()
    from ldm_pipeline.models import CONFIG_PREFIX, init_model, load_model_spec, resolve_model
    from ldm_pipeline.settings import resolve_device
    from ldm_pipeline.shapes.cli_make_shapes import main as make_shapes

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    model_arg = args.model or f"{CONFIG_PREFIX}{'sd15' if cuda else 'tiny'}"
    acc = Acceptance()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if model_arg.startswith(CONFIG_PREFIX):
            name = model_arg.removeprefix(CONFIG_PREFIX)
            model = init_model(name, work / "model", seed=0, overwrite=True)
            spec = load_model_spec(name)
            size = spec.unet["sample_size"] * 2 ** (len(spec.vae["block_out_channels"]) - 1)
        else:
            model = Path(resolve_model(model_arg))
            size = 512 if cuda else 64
        data = work / "data"
        if not data.is_dir():
            make_shapes(["--output", str(data), "--num-samples", "48", "--samples-per-shard", "16", "--seed", "0"])
        print(f"set-up: {model_arg} at {size}x{size} on {device}, data in {data} ({time.perf_counter() - t:.1f}s)")
        generation_checks(acc, model, work, device, size, cuda)
        fast = fast_check(acc, model, device, size, cuda, args.fast_repeats)
        training_checks(acc, model, data, work, device, cuda)
        sdxl = sdxl_checks(acc, data, work, device, cuda)
    failed = [n for n, c in acc.checks.items() if c["ok"] is False]
    print(f"\n{len(acc.checks) - len(failed)} of {len(acc.checks)} checks passed or skipped; failed: {failed or 'none'}")
    rec = results.record("gpu", begun, device=device, raw={"fast": fast, "sdxl": sdxl}, derived={"failed": failed},
                         settings={"model": model_arg, "size": size, "device": device,
                                   "fast_repeats": args.fast_repeats})
    # the acceptance fields at the top level: device (from record), checks, and the --fast ratio at sd15 512 px
    rec["checks"] = acc.checks
    rec["fast_speedup_sd15_512"] = fast.get("ratio") if model_arg == f"{CONFIG_PREFIX}sd15" and size == 512 else None
    if not args.no_save:
        print(f"results: {results.write(rec, args.results_dir)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
