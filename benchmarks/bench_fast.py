"""`--fast` against plain diffusers: images/s end to end, or the UNet step alone, with each speed-up off in turn.

Plain diffusers is a `StableDiffusionPipeline` loaded from the same model folder (or, with --unet-only, the same
randomly initialised UNet) in the precision a user would run it in: fp32 on CPU, fp16 on CUDA. Ours is
`ImageGenerator.load(..., RuntimeOptions(fast=True))`, and with --ablate also that plan with one speed-up switched
off at a time. All variants run interleaved, each repeat in a rotated order, on the same prompt and seeds (DDIM, CFG
on every step). The first call of each variant (torch.compile's compilation, oneDNN's first-use set-up) is timed
apart and left out of the medians. Images are compared with plain diffusers' (PSNR, dB; ∞ = identical pixels).
Every repeat goes to benchmarks/results/fast-<date>.json (see results.py; report.py makes the tables).

  python benchmarks/bench_fast.py --model shapes --ablate                  # the shipped model, batch 1, CPU
  python benchmarks/bench_fast.py --model shapes --batch-size 8
  python benchmarks/bench_fast.py --model config:sd15 --unet-only --height 512 --width 512 --repeats 3
  python benchmarks/bench_fast.py --model config:sd15 --height 512 --width 512 --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import results  # noqa: E402  (benchmarks/results.py)

PROMPT = "a red circle on a blue background, highly detailed"


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 image arrays (inf when identical)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ablations(plan, device: str) -> dict:
    """The fast plan, and the plan with each speed-up flipped alone: off where the plan uses it, on where the plan
    leaves it out on this device (so each one is measured on and off)."""
    from ldm_pipeline.fast import cpu_has_native_bf16

    out = {"fast": plan}
    if plan.dtype != "fp32":
        out[f"fast without {plan.dtype}"] = dataclasses.replace(plan, dtype="fp32")
    elif device == "cpu" and cpu_has_native_bf16():
        out["fast with bf16"] = dataclasses.replace(plan, dtype="bf16")
    for field, label in (("channels_last", "channels-last"), ("fuse_qkv", "fused QKV"), ("compile", "compile")):
        on = getattr(plan, field)
        out[f"fast {'without' if on else 'with'} {label}"] = dataclasses.replace(plan, **{field: not on})
    return out


def pipeline_variants(args, model: str, device: str) -> tuple[dict[str, Callable[[int], list]], dict]:
    """name → run(seed) giving a batch of PIL images, for plain diffusers and the fast plan(s)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_pipeline.fast import apply_plan, plan_for
    from ldm_pipeline.generator import ImageGenerator
    from ldm_pipeline.settings import Job, RuntimeOptions, torch_dtype

    plain_dtype = args.plain_dtype or ("fp16" if device.startswith("cuda") else "fp32")
    # no safety checker on either side (ours never loads one): the same work is timed
    plain = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype(plain_dtype), safety_checker=None,
                                                    requires_safety_checker=False).to(device)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plan = plan_for(device, args.dtype, unet_params=plain.unet.num_parameters())
    if args.no_compile:
        plan = dataclasses.replace(plan, compile=False)
    plans = ablations(plan, device) if args.ablate else {"fast": plan}
    gens = {}
    for name, p in plans.items():
        gens[name] = ImageGenerator.load(model, RuntimeOptions(device=device, dtype=p.dtype))
        apply_plan(gens[name].pipe, p, device)
    defaults = next(iter(gens.values())).defaults
    h, w = args.height or defaults.height, args.width or defaults.width

    def run_plain(seed: int) -> list:
        gens_ = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.batch_size)]
        return plain([PROMPT] * args.batch_size, height=h, width=w, num_inference_steps=args.steps,
                     guidance_scale=args.guidance_scale, generator=gens_).images

    def ours(gen) -> Callable[[int], list]:
        def run(seed: int) -> list:
            jobs = [Job(PROMPT, seed=seed + i, index=i, num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale, guidance_cutoff=0.0, scheduler="ddim", height=h, width=w)
                    for i in range(args.batch_size)]
            return [r.image for r in gen.generate(jobs, batch_size=args.batch_size)]

        return run

    runs: dict[str, Callable[[int], list]] = {f"plain diffusers {plain_dtype}": run_plain}
    runs.update({name: ours(gen) for name, gen in gens.items()})
    settings = {"height": h, "width": w, "steps": args.steps, "scheduler": "ddim", "guidance_scale": args.guidance_scale,
                "guidance_cutoff": 0.0, "batch_size": args.batch_size, "plain_dtype": plain_dtype,
                "plans": {n: p.as_record() for n, p in plans.items()}, "prompt": PROMPT,
                "unit": "seconds per batch of batch_size images"}
    return runs, settings


def unet_variants(args, spec_name: str, device: str) -> tuple[dict[str, Callable[[int], list]], dict]:
    """name → run(seed) giving the UNet's output for one CFG step (a batch of 2 × batch size), random weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm_pipeline.fast import plan_for, prepare_unet
    from ldm_pipeline.models import load_model_spec
    from ldm_pipeline.settings import torch_dtype

    spec = load_model_spec(spec_name)
    torch.manual_seed(0)
    base = UNet2DConditionModel(**spec.unet).eval()
    plain_dtype = args.plain_dtype or ("fp16" if device.startswith("cuda") else "fp32")
    plan = plan_for(device, args.dtype, unet_params=base.num_parameters())
    if args.no_compile:
        plan = dataclasses.replace(plan, compile=False)
    plans = ablations(plan, device) if args.ablate else {"fast": plan}
    factor = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    h, w = (args.height or spec.unet["sample_size"] * factor), (args.width or spec.unet["sample_size"] * factor)
    n = 2 * args.batch_size
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, spec.unet["in_channels"], h // factor, w // factor, generator=gen)
    text = torch.randn(n, 77, spec.unet["cross_attention_dim"], generator=gen)

    def make(dtype_name: str, p=None) -> Callable[[int], list]:
        import copy

        unet = copy.deepcopy(base).to(device, torch_dtype(dtype_name))
        if p is not None:
            unet = prepare_unet(unet, p, device)
        x, e = latents.to(device, torch_dtype(dtype_name)), text.to(device, torch_dtype(dtype_name))

        def run(seed: int) -> list:
            with torch.inference_mode():
                out = unet(x, torch.tensor(500 + seed % 7, device=device), encoder_hidden_states=e).sample
                return [out.float().clone()]  # a copy: CUDA graphs reuse the output's memory at the next call

        return run

    runs = {f"plain diffusers {plain_dtype}": make(plain_dtype)}
    runs.update({name: make(p.dtype, p) for name, p in plans.items()})
    settings = {"height": h, "width": w, "unet_batch": n, "batch_size": args.batch_size, "plain_dtype": plain_dtype,
                "plans": {n_: p.as_record() for n_, p in plans.items()}, "unit": "seconds per UNet call (one CFG step)"}
    return runs, settings


def measure(runs: dict[str, Callable[[int], list]], repeats: int, device: str, verbose: bool = True):
    """Each variant's first call (compilation, warm-up; seed 0), timed apart, then `repeats` timed rounds in a
    rotating order so machine noise hits every variant alike. Returns (first-call outputs, first-call seconds,
    seconds per round, the order of each round)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(runs)

    def timed(name: str, seed: int):
        sync()
        t = time.perf_counter()
        out = runs[name](seed)
        sync()
        return out, time.perf_counter() - t

    outputs: dict[str, list] = {}
    first_call: dict[str, float] = {}
    for name in names:
        outputs[name], first_call[name] = timed(name, 0)
        if verbose:
            print(f"first call, {name}: {first_call[name]:.2f}s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    orders = []
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            times[name].append(timed(name, r + 1)[1])
        if verbose:
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.4f}s" for n in names), flush=True)
    return outputs, first_call, times, orders


def closeness(outputs: dict[str, list], reference: str, unet_only: bool) -> dict[str, float]:
    """PSNR of each variant's images against plain diffusers' (UNet-only: relative RMS error of the output)."""
    ref = outputs[reference]
    out = {}
    for name, got in outputs.items():
        if unet_only:
            r, g = ref[0], got[0].to(ref[0].device)
            out[name] = float((g - r).pow(2).mean().sqrt() / r.std())
        else:
            out[name] = min(psnr(a, b) for a, b in zip(got, ref, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="what `ldm txt2img --model` takes, or config:NAME for random "
                                                     "weights from configs/models/NAME.yaml (default: shapes)")
    p.add_argument("--unet-only", action="store_true", help="time one UNet call (a CFG step) instead of whole images")
    p.add_argument("--ablate", action="store_true", help="also run the fast plan with each speed-up flipped alone")
    p.add_argument("--no-compile", action="store_true", help="the fast plan without torch.compile (a quick look: "
                                                             "compiling takes from seconds to minutes)")
    p.add_argument("--height", type=int, help="default: the model's")
    p.add_argument("--width", type=int, help="default: the model's")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="the fast path's precision (default: its own)")
    p.add_argument("--plain-dtype", choices=["fp32", "fp16", "bf16"], help="plain diffusers' (default: fp32 on "
                                                                           "CPU, fp16 on CUDA)")
    p.add_argument("--device", default="auto")
    results.add_arguments(p)
    args = p.parse_args(argv)
    from ldm_pipeline.models import CONFIG_PREFIX, init_model, resolve_model
    from ldm_pipeline.settings import resolve_device

    begun = results.start()
    import torch

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.unet_only:
            runs, settings = unet_variants(args, args.model.removeprefix(CONFIG_PREFIX), device)
        else:
            if args.model.startswith(CONFIG_PREFIX):
                model = str(init_model(args.model.removeprefix(CONFIG_PREFIX), os.path.join(tmp, "model"), seed=0))
            else:
                model = resolve_model(args.model)
            runs, settings = pipeline_variants(args, model, device)
        outputs, first_call, times, orders = measure(runs, args.repeats, device)
    names = list(runs)
    plain = names[0]
    med = {n: statistics.median(times[n]) for n in names}
    close = closeness(outputs, plain, args.unet_only)
    speedup = {n: med[plain] / med[n] for n in names}
    dev = results.device_info(device)["name"]
    what = "UNet call (one CFG step)" if args.unet_only else f"{args.steps} DDIM steps"
    print(f"\n{args.model} {settings['width']}x{settings['height']}, {what}, batch {args.batch_size}, {dev}\n")
    metric = "output rel. RMS error" if args.unet_only else "min PSNR dB vs plain"
    print(f"| variant | median s | speed-up vs plain | first call s | {metric} |\n|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.4f} | {speedup[n]:.2f}x | {first_call[n]:.1f} | {close[n]:.4g} |")
    settings.update(model=args.model, unet_only=args.unet_only, repeats=args.repeats, device=device,
                    threads=torch.get_num_threads(), seeds="repeat r, image i: seed r + 1 + i; first call: seed 0")
    raw = {"times": times, "first_call_s": first_call, "orders": orders}
    derived = {"median_s": med, "speedup_vs_plain": speedup, "plain": plain,
               ("rel_rmse_vs_plain" if args.unet_only else "min_psnr_db_vs_plain"):
                   {n: (None if math.isinf(v) else v) for n, v in close.items()}}
    if not args.unet_only:
        derived["images_per_s"] = {n: args.batch_size / med[n] for n in names}
    results.save("fast", begun, args, device=device, settings=settings, raw=raw, derived=derived)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
