"""End-to-end txt2img time: ldm_pipeline's Generator vs plain diffusers StableDiffusionPipeline.

Both run on the very same components (one loaded pipeline), prompts, seeds and settings (DDIM, CFG on every step),
interleaved so that machine noise hits both alike; the table shows medians and the ratio ours/plain (target ≤ 1.02).
Every repeat is written to benchmarks/results/generate-<date>.json (see results.py; report.py makes the tables).

  python benchmarks/bench_generate.py                                 # config:tiny (random weights), 64x64, CPU
  python benchmarks/bench_generate.py --model shapes --batch-size 8   # the shipped shapes model
  python benchmarks/bench_generate.py --model config:sd15 --height 512 --width 512 --dtype fp16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import results  # noqa: E402  (benchmarks/results.py)

PROMPT = "a red circle on a blue background, highly detailed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="what `ldm txt2img --model` takes: the shipped 'shapes', a diffusers folder, a "
                                   ".safetensors file, or config:NAME for random weights from configs/models/NAME.yaml "
                                   "(written to a temporary model folder first) (default: config:tiny)")
    p.add_argument("--config", help="the same as --model config:NAME")
    p.add_argument("--height", type=int, help="default: the model's")
    p.add_argument("--width", type=int, help="default: the model's")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads; default: torch's own, "
                                               "usually the core count); 1 suffers least on a shared CPU")
    results.add_arguments(p)
    args = p.parse_args(argv)
    if args.model and args.config:
        p.error("give --model or --config, not both")
    from ldm_pipeline.models import CONFIG_PREFIX, init_model, resolve_model  # light: no torch yet

    model_arg = args.model or f"{CONFIG_PREFIX}{args.config or 'tiny'}"
    begun = results.start()

    import torch
    from diffusers import DDIMScheduler

    if args.threads:
        torch.set_num_threads(args.threads)

    from ldm_pipeline.errors import UserError
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.settings import Job, RuntimeOptions

    with tempfile.TemporaryDirectory() as tmp:
        try:
            if model_arg.startswith(CONFIG_PREFIX):  # random weights, saved and loaded as a user's folder would be
                model = str(init_model(model_arg.removeprefix(CONFIG_PREFIX), os.path.join(tmp, "model"), seed=0))
            else:
                model = resolve_model(model_arg)  # `shapes` → the packaged model's folder
            gen = Generator.load(model, RuntimeOptions(device=args.device, dtype=args.dtype))
        except UserError as e:
            print(f"bench_generate: {e}", file=sys.stderr)
            return 2
        pipe = gen.pipe
        h = args.height or gen.defaults.height
        w = args.width or gen.defaults.width
        sync = torch.cuda.synchronize if gen.device.startswith("cuda") else (lambda: None)

        def ours(seed: int) -> None:
            # guidance_cutoff=0: CFG on every step as plain diffusers does (the shipped model's default cut-off
            # would skip the unconditional pass on its late steps and make ours look faster than it is)
            jobs = [Job(PROMPT, seed=seed + i, index=i, num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale, guidance_cutoff=0.0, scheduler="ddim", height=h, width=w)
                    for i in range(args.batch_size)]
            list(gen.generate(jobs, batch_size=args.batch_size))

        ddim = DDIMScheduler.from_config(gen.base_scheduler_config)

        def plain(seed: int) -> None:
            pipe.scheduler = ddim
            pipe([PROMPT] * args.batch_size, height=h, width=w, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale,
                 generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(args.batch_size)])

        times: dict[str, list[float]] = {"ours": [], "plain": []}
        warm: dict[str, list[float]] = {"ours": [], "plain": []}
        first: list[str] = []
        for r in range(args.warmup + args.repeats):
            order = [("ours", ours), ("plain", plain)] if r % 2 == 0 else [("plain", plain), ("ours", ours)]
            if r >= args.warmup:
                first.append(order[0][0])
            for name, fn in order:
                sync()
                t = time.perf_counter()
                fn(r)
                sync()
                (times if r >= args.warmup else warm)[name].append(time.perf_counter() - t)
            label = f"repeat {r - args.warmup + 1}/{args.repeats}" if r >= args.warmup else f"warm-up {r + 1}"
            done = times if r >= args.warmup else warm
            print(f"{label}: plain {done['plain'][-1]:.4f}s, ours {done['ours'][-1]:.4f}s", flush=True)
        mo, mp = statistics.median(times["ours"]), statistics.median(times["plain"])
        dev = results.device_info(gen.device)["name"]
        print(f"\n{model_arg} {w}x{h}, {args.steps} DDIM steps, CFG {args.guidance_scale}, "
              f"batch {args.batch_size}, {args.dtype}, {dev}, {args.repeats} interleaved repeats\n")
        print("| pipeline | median s/batch | min s | ratio vs plain |")
        print("|---|---|---|---|")
        print(f"| plain diffusers StableDiffusionPipeline | {mp:.4f} | {min(times['plain']):.4f} | 1.000 |")
        print(f"| ldm_pipeline Generator | {mo:.4f} | {min(times['ours']):.4f} | {mo / mp:.3f} |")
        settings = {
            "model": model_arg, "model_source": gen.info.source, "model_name": gen.info.name,
            "model_hash": gen.info.hash, "height": h, "width": w, "steps": args.steps, "scheduler": "ddim",
            "guidance_scale": args.guidance_scale, "guidance_cutoff": 0.0, "batch_size": args.batch_size,
            "dtype": args.dtype, "device": gen.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "warmup": args.warmup, "prompt": PROMPT,
            "seeds": "repeat r, image i: seed r + i (warm-up repeats included in r)",
        }
        raw = {"unit": "seconds per batch", "plain": times["plain"], "ours": times["ours"], "first_in_pair": first,
               "warmup": warm}
        derived = {"median_plain_s": mp, "median_ours_s": mo, "ratio": mo / mp, "min_plain_s": min(times["plain"]),
                   "min_ours_s": min(times["ours"]), "ratio_of_mins": min(times["ours"]) / min(times["plain"])}
        results.save("generate", begun, args, device=gen.device, settings=settings, raw=raw, derived=derived)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
