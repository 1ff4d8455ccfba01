"""The README's sample grid: the shipped model (or --model) on held-in and held-out prompts, prompt under each image.

  python examples/shapes_grid.py --output docs/shapes_grid.png
"""

from __future__ import annotations

import argparse

from ldm_pipeline import ImageGenerator, Job, RuntimeOptions
from ldm_pipeline.grid import make_grid

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a blue triangle on a white background",
    "a black circle on an orange background, on the left",
    "a white triangle on a red background, at the top",
    "a purple square on a yellow background, on the right",
    # held out of training: these colour/shape pairs were never drawn
    "a green triangle on a white background",
    "a purple circle on a yellow background",
    "an orange square on a blue background",
    "a white circle on a black background",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the shipped model")
    p.add_argument("--output", default="shapes_grid.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gen = ImageGenerator.load(args.model, RuntimeOptions(device="cpu"))
    jobs = [Job(prompt, seed=args.seed + i, index=i) for i, prompt in enumerate(PROMPTS)]
    images = [r.image for r in gen.generate(jobs)]
    captions = [f"{prompt}{' (held out)' if i >= 6 else ''}" for i, prompt in enumerate(PROMPTS)]
    make_grid(images, captions, cols=5).save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
