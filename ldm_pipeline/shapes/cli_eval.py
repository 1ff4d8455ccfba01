"""ldm eval: measure how well a model follows prompts in the shapes domain (the shipped model's world).

  ldm eval --model path/to/model --output-dir eval/
  ldm eval --model path/to/model --scheduler dpm++2m --steps 20 --seeds-per-prompt 4

Samples the fixed prompt set (held-in colour/shape pairs, the four held-out pairs, named positions), classifies
every image by its pixels (background colour, shape colour, shape type, position), recolours generated shapes with
img2img (strength 0.6), and writes report.md, report.json and a sample grid PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm_pipeline.cli.common import Parser, add_model_args, run_main


def build_parser(prog: str = "ldm eval") -> argparse.ArgumentParser:
    from ldm_pipeline.schedulers import SCHEDULERS

    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    p.add_argument("--output-dir", "-o", default="outputs/eval", help="where report.md/json and grid.png go")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--guidance-cutoff", type=float, metavar="FRACTION",
                   help="CFG only at timesteps >= FRACTION × the scheduler's training timesteps, in [0, 1] "
                   "(default: the model's)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), metavar="NAME", help="sampler (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--recolour", type=int, default=40, help="img2img recolour edits to score (0 = skip)")
    p.add_argument("--strength", type=float, default=0.6, help="img2img strength of the recolour test")
    p.add_argument("--max-prompts", type=int, help="a quick look: only the first N prompts of each set")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--fast", action="store_true", help="score the --fast path (see ldm txt2img --help)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline.errors import UserError

    if args.seeds_per_prompt < 1:
        raise UserError("--seeds-per-prompt must be at least 1")
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.grid import make_grid
    from ldm_pipeline.outputs import check_outdir
    from ldm_pipeline.settings import RuntimeOptions
    from ldm_pipeline.shapes.evaluate import EvalSettings, run_eval

    out = Path(args.output_dir)
    check_outdir(out)
    gen = Generator.load(args.model, RuntimeOptions(device=args.device, allow_pickle=args.allow_pickle,
                                                    model_config=args.model_config, lora=args.lora,
                                                    lora_scale=args.lora_scale, fast=args.fast,
                                                    dtype="auto"))
    settings = EvalSettings(seeds_per_prompt=args.seeds_per_prompt, seed=args.seed, num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, guidance_cutoff=args.guidance_cutoff,
                            scheduler=args.scheduler, batch_size=args.batch_size, recolour_prompts=args.recolour,
                            recolour_strength=args.strength, max_prompts_per_set=args.max_prompts)
    result = run_eval(gen, settings, progress=not args.quiet)
    report = {"model": gen.info.name, "model_hash": gen.info.hash, "dtype": gen.options.dtype,
              "fast": gen.fast_plan.as_record() if gen.fast_plan else None, "settings": vars(settings) | {
        "num_inference_steps": settings.num_inference_steps or gen.defaults.num_inference_steps,
        "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None else gen.defaults.guidance_scale,
        "guidance_cutoff": (settings.guidance_cutoff if settings.guidance_cutoff is not None
                            else gen.defaults.guidance_cutoff),
        "scheduler": settings.scheduler or gen.defaults.scheduler}, **result.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(result.to_markdown() + "\n")
    # one image per prompt in the grid, prompts under each
    seen, cells = set(), []
    for image, prompt in result.images:
        if prompt not in seen:
            seen.add(prompt)
            cells.append((image, prompt))
    make_grid([c[0] for c in cells], [c[1] for c in cells], cols=10).save(out / "grid.png")
    print(result.to_markdown())
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {out / 'grid.png'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm eval") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
