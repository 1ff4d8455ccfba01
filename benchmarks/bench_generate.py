"""End-to-end txt2img time: ldm_pipeline's Generator vs plain diffusers StableDiffusionPipeline.

Both run on the very same components (one loaded pipeline), prompts, seeds and settings, interleaved so that
machine noise hits both alike; the table shows medians and the ratio ours/plain (target ≤ 1.02).

  python benchmarks/bench_generate.py                      # tiny config, 64x64, CPU
  python benchmarks/bench_generate.py --config sd15 --height 512 --width 512 --dtype fp16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="configs/models architecture (random weights)")
    p.add_argument("--model", help="an existing model folder instead of --config")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    import torch
    from diffusers import DDIMScheduler

    from ldm_pipeline.models import init_model
    from ldm_pipeline.pipeline import Generator, Job, RuntimeOptions

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(init_model(args.config, os.path.join(tmp, "model"), seed=0))
        gen = Generator.load(model, RuntimeOptions(device=args.device, dtype=args.dtype))
        pipe = gen.pipe
        h = args.height or gen.defaults.height
        w = args.width or gen.defaults.width
        prompt = "a red circle on a blue background, highly detailed"
        sync = torch.cuda.synchronize if gen.device.startswith("cuda") else (lambda: None)

        def ours(seed: int) -> None:
            jobs = [Job(prompt, seed=seed + i, index=i, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                        scheduler="ddim", height=h, width=w) for i in range(args.batch_size)]
            list(gen.generate(jobs, batch_size=args.batch_size))

        ddim = DDIMScheduler.from_config(gen.base_scheduler_config)

        def plain(seed: int) -> None:
            pipe.scheduler = ddim
            pipe([prompt] * args.batch_size, height=h, width=w, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale,
                 generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(args.batch_size)])

        times = {"ours": [], "plain": []}
        for r in range(args.warmup + args.repeats):
            order = [("ours", ours), ("plain", plain)] if r % 2 == 0 else [("plain", plain), ("ours", ours)]
            for name, fn in order:
                sync()
                t = time.perf_counter()
                fn(r)
                sync()
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t)
        mo, mp = statistics.median(times["ours"]), statistics.median(times["plain"])
        dev = torch.cuda.get_device_name() if gen.device.startswith("cuda") else "CPU"
        print(f"\n{args.model or args.config} {w}x{h}, {args.steps} DDIM steps, CFG {args.guidance_scale}, "
              f"batch {args.batch_size}, {args.dtype}, {dev}, {args.repeats} interleaved repeats\n")
        print("| pipeline | median s/batch | min s | ratio vs plain |")
        print("|---|---|---|---|")
        print(f"| plain diffusers StableDiffusionPipeline | {mp:.4f} | {min(times['plain']):.4f} | 1.000 |")
        print(f"| ldm_pipeline Generator | {mo:.4f} | {min(times['ours']):.4f} | {mo / mp:.3f} |")


if __name__ == "__main__":
    main()
