"""Training throughput of `ldm train`'s loop against a minimal diffusers-example loop, interleaved in one run.

  python benchmarks/bench_train.py                                  # config:tiny (random weights), CPU, 64px
  python benchmarks/bench_train.py --model config:sd15 --resolution 512 --batch-size 4 --steps 20   # on a GPU

The baseline is written the way diffusers' examples/text_to_image/train_text_to_image.py trains (VAE encode and
text encode every step, AdamW on the UNet, accelerate prepare, same data loader, batch size and precision). Ours
runs `ldm_pipeline.training.train` with EMA, checkpoints and validation off, with and without `cache_latents`.
Throughput counts only the optimizer steps after `--warmup` steps (ours: TrainResult.train_seconds; the caching
pass is reported separately). Variants are interleaved round by round; the table shows medians. Every round is
written to benchmarks/results/train-<date>.json (see results.py; report.py makes the tables).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py)


def baseline(model: str, data: str, resolution: int, batch_size: int, steps: int, warmup: int, mp: str) -> dict:
    """{samples, seconds, samples_per_s} of the steps after `warmup` of a train_text_to_image.py-style loop."""
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
    dt = time.perf_counter() - t0
    accelerator.free_memory()
    _reset()
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt}


def ours(model: str, data: str, out: Path, resolution: int, batch_size: int, steps: int, warmup: int, mp: str,
         cache: bool, cache_dir: Path) -> dict:
    """{samples, seconds, samples_per_s} of the optimizer steps after warm-up, the caching pass's seconds, and the
    two runs it is the difference of."""
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
    n = full.samples_seen - short.samples_seen
    if dt <= 0:
        print(f"warning: {warmup + steps} steps took no longer than {warmup} ({full.train_seconds:.2f}s vs "
              f"{short.train_seconds:.2f}s): too few --steps to measure; the rate below is meaningless", flush=True)
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt,
            "cache_seconds": max(short.cache_seconds, full.cache_seconds),
            "runs": [{"global_step": r.global_step, "samples_seen": r.samples_seen, "train_seconds": r.train_seconds,
                      "cache_seconds": r.cache_seconds} for r in (short, full)]}


def _reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="what `ldm train` starts from: the shipped 'shapes', a diffusers folder, or "
                                   "config:NAME, random weights from configs/models/NAME.yaml (default: config:tiny)")
    p.add_argument("--model-config", help="a configs/models name (random weights) or a model folder; the old "
                                          "spelling of --model config:NAME")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=128, help="images in the generated dataset")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads; default: torch's own, "
                                               "usually the core count); 1 suffers least on a shared CPU")
    results.add_arguments(p)
    args = p.parse_args(argv)
    if args.model and args.model_config:
        p.error("give --model or --model-config, not both")

    from ldm_pipeline.errors import UserError
    from ldm_pipeline.models import CONFIG_PREFIX, init_model, resolve_model

    model_arg = args.model or args.model_config or f"{CONFIG_PREFIX}tiny"
    if args.model_config and not Path(args.model_config).is_dir():
        model_arg = CONFIG_PREFIX + args.model_config.removeprefix(CONFIG_PREFIX)
    begun = results.start()

    import torch

    from ldm_pipeline.shapes.domain import write_shards  # what `ldm make-shapes` writes

    if args.threads:
        torch.set_num_threads(args.threads)

    mp = args.mixed_precision
    if mp == "auto":
        mp = "fp16" if torch.cuda.is_available() else "no"
    work = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        try:
            if model_arg.startswith(CONFIG_PREFIX):  # random weights, written as a model folder ldm train starts from
                model = str(init_model(model_arg.removeprefix(CONFIG_PREFIX), work / "model", seed=0))
            else:
                model = resolve_model(model_arg)  # `shapes` → the packaged model's folder
                if not Path(model).is_dir():
                    raise UserError(f"{model_arg}: bench_train needs a model folder, the shipped 'shapes' or "
                                    "config:NAME")
        except UserError as e:
            print(f"bench_train: {e}", file=sys.stderr)
            return 2
        data = work / "data"
        # img2dataset-style shards; the loader resizes/crops them to --resolution
        write_shards(data, args.samples, seed=0, samples_per_shard=max(1, args.samples // 4))
        names = {"example": "diffusers-example loop", "ours": "ldm train", "ours_cached": "ldm train --cache-latents"}
        raw: dict[str, list[dict]] = {k: [] for k in names}
        for r in range(args.rounds):
            raw["example"].append(
                baseline(model, str(data), args.resolution, args.batch_size, args.steps, args.warmup, mp))
            raw["ours"].append(ours(model, str(data), work / f"o{r}", args.resolution, args.batch_size, args.steps,
                                    args.warmup, mp, False, work / "cache"))
            raw["ours_cached"].append(ours(model, str(data), work / f"c{r}", args.resolution, args.batch_size,
                                           args.steps, args.warmup, mp, True, work / "cache"))
            print(f"round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{names[k]} {v[-1]['samples_per_s']:.1f}" for k, v in raw.items()), flush=True)
        med = {k: statistics.median(m["samples_per_s"] for m in v) for k, v in raw.items()}
        base = med["example"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = results.device_info(device)["name"]
        print(f"\nmodel {model_arg}, {args.resolution}px, batch {args.batch_size}, precision {mp}, {dev}, "
              f"median of {args.rounds} rounds x {args.steps} steps")
        print(f"{'loop':<28} {'samples/s':>10} {'vs example':>11}")
        for k, name in names.items():
            print(f"{name:<28} {med[k]:>10.2f} {med[k] / base:>10.2f}x")
        cache_s = raw["ours_cached"][0]["cache_seconds"]
        print(f"caching pass ({args.samples} images, first round; later rounds reuse it): {cache_s:.1f}s")
        settings = {
            "model": model_arg, "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "samples": args.samples, "mixed_precision": mp,
            "device": device, "threads": torch.get_num_threads(), "optimizer": "AdamW", "ema": False, "variants": names,
        }
        derived = {
            "median_samples_per_s": med,
            "ratio_vs_example": {k: med[k] / base for k in names},
            "cache_seconds_first_round": cache_s,
        }
        results.save("train", begun, args, device=device, settings=settings,
                     raw={"unit": "samples and seconds of the timed optimizer steps, per round", **raw},
                     derived=derived)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
