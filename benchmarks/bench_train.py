"""Training throughput of `ldm train`'s loop against a minimal diffusers-example loop, interleaved in one run.

  python benchmarks/bench_train.py                                  # tiny model, CPU, 64px
  python benchmarks/bench_train.py --model-config sd15 --resolution 512 --batch-size 4 --steps 20   # on a GPU

The baseline is written the way diffusers' examples/text_to_image/train_text_to_image.py trains (VAE encode and
text encode every step, AdamW on the UNet, accelerate prepare, same data loader, batch size and precision). Ours
runs `ldm_pipeline.training.train` with EMA, checkpoints and validation off, with and without `cache_latents`.
Throughput counts only the optimizer steps after `--warmup` steps (ours: TrainResult.train_seconds; the caching
pass is reported separately). Variants are interleaved round by round; the table shows medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def baseline(model: str, data: str, resolution: int, batch_size: int, steps: int, warmup: int, mp: str) -> float:
    """samples/s of a train_text_to_image.py-style loop."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from ldm_pipeline.data import DataConfig, build_dataset, make_dataloader
    from ldm_pipeline.models import load_pipeline

    accelerator = Accelerator(mixed_precision=mp)
    pipe, _ = load_pipeline(model)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    cfg = DataConfig(source=data, resolution=resolution, num_workers=2)
    loader = iter(make_dataloader(build_dataset(cfg, batch_size, tokenizer=tokenizer), cfg.num_workers))
    t0, n = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        batch = next(loader)
        with accelerator.accumulate(unet):
            latents = vae.encode(batch["pixel_values"].to(accelerator.device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            ehs = text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]
            pred = unet(noisy, timesteps, ehs, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        n += bsz
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    accelerator.free_memory()
    _reset()
    return rate


def ours(model: str, data: str, out: Path, resolution: int, batch_size: int, steps: int, warmup: int, mp: str,
         cache: bool, cache_dir: Path) -> tuple[float, float]:
    """(samples/s of the optimizer steps after warm-up, seconds of the caching pass)."""
    from ldm_pipeline.training import load_train_config, train

    def run(max_steps: int, where: Path):
        cfg = load_train_config(None, {
            "model": model, "output_dir": str(where), "data": {"source": data, "resolution": resolution,
                                                               "num_workers": 2},
            "max_steps": max_steps, "batch_size": batch_size, "gradient_accumulation_steps": 1,
            "mixed_precision": mp, "ema": {"enabled": False}, "checkpoint_every": 0, "validate_every": 0,
            "report_to": "none", "progress_bar": False, "cache_latents": cache, "cache_dir": str(cache_dir),
            "lr_warmup_steps": 0, "overwrite": True,
        })
        res = train(cfg)
        _reset()
        return res

    # two runs: their difference removes loading and warm-up (first steps are slower everywhere)
    short = run(warmup, out / "short")
    full = run(warmup + steps, out / "full")
    dt = full.train_seconds - short.train_seconds
    return (full.samples_seen - short.samples_seen) / dt, max(short.cache_seconds, full.cache_seconds)


def _reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="tiny", help="configs/models name (random weights) or a model folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=128, help="images in the generated dataset")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    args = p.parse_args(argv)

    import torch

    from ldm_pipeline.data.fixtures import write_laion_fixture
    from ldm_pipeline.models import init_model

    mp = args.mixed_precision
    if mp == "auto":
        mp = "fp16" if torch.cuda.is_available() else "no"
    work = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        model = args.model_config
        if not Path(model).is_dir():
            model = str(init_model(model, work / "model", seed=0))
        data = work / "data"
        write_laion_fixture(data, n=args.samples, shards=4, sizes=((args.resolution, args.resolution),))
        results: dict[str, list[float]] = {"diffusers-example loop": [], "ldm train": [], "ldm train --cache-latents": []}
        cache_secs = []
        for r in range(args.rounds):
            results["diffusers-example loop"].append(
                baseline(model, str(data), args.resolution, args.batch_size, args.steps, args.warmup, mp))
            results["ldm train"].append(ours(model, str(data), work / f"o{r}", args.resolution, args.batch_size,
                                             args.steps, args.warmup, mp, False, work / "cache")[0])
            rate, secs = ours(model, str(data), work / f"c{r}", args.resolution, args.batch_size, args.steps,
                              args.warmup, mp, True, work / "cache")
            results["ldm train --cache-latents"].append(rate)
            cache_secs.append(secs)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
                  flush=True)
        base = statistics.median(results["diffusers-example loop"])
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        print(f"\nmodel {args.model_config}, {args.resolution}px, batch {args.batch_size}, precision {mp}, {device}, "
              f"median of {args.rounds} rounds x {args.steps} steps")
        print(f"{'loop':<28} {'samples/s':>10} {'vs example':>11}")
        for name, rates in results.items():
            med = statistics.median(rates)
            print(f"{name:<28} {med:>10.2f} {med / base:>10.2f}x")
        print(f"caching pass ({args.samples} images, first round; later rounds reuse it): {cache_secs[0]:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
