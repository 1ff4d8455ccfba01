"""ldm txt2img: generate images from text prompts.

  ldm txt2img "a red circle on a blue background" --seed 0
  ldm txt2img --from-file prompts.jsonl --model path/to/sd15 --scheduler dpm++2m-karras --steps 25 --grid
  ldm txt2img --replay outputs/txt2img/00003-1234.png
  torchrun --nproc_per_node 2 -m ldm_pipeline txt2img --from-file prompts.txt   (splits the prompts across processes)

Images are PNGs with A1111-compatible `parameters` and a JSON record that `--replay` regenerates bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_pipeline.cli.common import Parser, add_generation_args, run_main
from ldm_pipeline.errors import UserError


def build_parser(prog: str = "ldm txt2img", img2img: bool = False) -> argparse.ArgumentParser:
    doc = sys.modules[__name__].__doc__ if not img2img else sys.modules["ldm_pipeline.cli.img2img"].__doc__
    p = Parser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1])
    add_generation_args(p, img2img=img2img)
    return p


# flag → the setting whose rule (`ldm_pipeline.settings.check_setting`) it follows
FLAG_SETTINGS = {"steps": "num_inference_steps", "guidance_scale": "guidance_scale",
                 "guidance_rescale": "guidance_rescale", "guidance_cutoff": "guidance_cutoff", "eta": "eta",
                 "seed": "seed", "num_images": "num_images", "batch_size": "batch_size", "height": "height",
                 "width": "width", "clip_skip": "clip_skip", "strength": "strength"}


def check_args(args: argparse.Namespace, img2img: bool) -> None:
    """Argument errors that need no model (fast failures, before the heavy imports), then the sampling defaults
    filled in. A replay takes its sampling settings from the image, so giving any of them is an error."""
    from ldm_pipeline.cli.common import RECORDED_OPTIONS, apply_sampling_defaults
    from ldm_pipeline.settings import check_eta, check_img2img_steps, check_setting

    sources = sum(bool(x) for x in (args.prompt, args.from_file, args.replay))
    if sources == 0:
        raise UserError("no prompt: pass a prompt, --from-file FILE or --replay IMAGE.png")
    if sources > 1:
        raise UserError("pass only one of: prompt arguments, --from-file, --replay")
    if args.replay:
        given = [flag for dest, flag in RECORDED_OPTIONS.items() if getattr(args, dest, None) is not None]
        if given:
            raise UserError(f"--replay regenerates the image with the settings recorded in it: drop {', '.join(given)} "
                            "(only model, runtime and output options combine with --replay)")
    apply_sampling_defaults(args)
    for dest, setting in FLAG_SETTINGS.items():
        if problem := check_setting(setting, getattr(args, dest, None)):
            raise UserError(f"--{dest.replace('_', '-')} {problem}")
    if problem := check_eta(args.eta, args.scheduler):
        raise UserError(problem)
    if img2img:
        if not args.init_image and not args.replay and not args.from_file:
            raise UserError("img2img needs --init-image (a file, folder or glob)")
        if args.steps is not None and (problem := check_img2img_steps(args.steps, args.strength)):
            raise UserError(problem)


def jobs_from_args(args: argparse.Namespace, img2img: bool, base_seed: int) -> list:
    """Expand prompts × images (× init images) into Jobs; image i of the run gets base_seed + i (a row's own seed
    s gives its images s, s+1, …)."""
    from ldm_pipeline.images import check_image_readable, expand_image_paths
    from ldm_pipeline.prompts import read_prompt_file
    from ldm_pipeline.settings import RANDOM, Job, wrap_seed

    rows = read_prompt_file(args.from_file) if args.from_file else [{"prompt": p} for p in args.prompt]
    for r in rows:
        if not r["prompt"].strip():
            raise UserError("empty prompt: give some text (use --negative-prompt for what to avoid)")
    run = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        guidance_cutoff=args.guidance_cutoff,
        scheduler=args.scheduler,
        eta=args.eta,
        height=args.height,
        width=args.width,
        clip_skip=args.clip_skip,
        original_size=args.original_size,
        target_size=args.target_size,
        crop_top_left=args.crop_top_left,
    )
    if img2img:
        run.update(strength=args.strength, resize_mode=args.resize_mode)
    jobs = []
    for row in rows:
        row = dict(row)
        n = row.pop("num_images", args.num_images)
        row_seed = row.pop("seed", None)
        if row_seed == RANDOM:  # "seed": -1 is "random": the run's seed sequence, as for a row without a seed
            row_seed = None
        init_spec = row.pop("init_image", None) or (args.init_image if img2img else None)
        if img2img and not init_spec:
            raise UserError(f"no init image for prompt '{row['prompt'][:40]}': pass --init-image or an init_image column")
        inits = expand_image_paths(init_spec) if img2img else [None]
        for path in inits:
            if path is not None:
                check_image_readable(path)
        for init in inits:
            for k in range(n):
                i = len(jobs)
                seed = wrap_seed(row_seed + k) if row_seed is not None else wrap_seed(base_seed + i)
                jobs.append(Job(**{**run, **row}, seed=seed, init_image=init, index=i))
    return jobs


def _lora_scale(args: argparse.Namespace, record: dict | None) -> float:
    if args.lora_scale is not None:
        return args.lora_scale
    if record is not None and record.get("lora_scale") is not None:
        return record["lora_scale"]  # a recorded 0.0 stays 0.0
    return 1.0


def run(args: argparse.Namespace, img2img: bool = False) -> int:
    check_args(args, img2img)
    from ldm_pipeline.outputs import check_outdir
    from ldm_pipeline.replay import read_record, recorded_model
    from ldm_pipeline.settings import RANDOM, RuntimeOptions

    outdir = Path(args.outdir)
    check_outdir(outdir)
    record = None
    if args.replay:
        record = read_record(args.replay)
        if (record.get("mode") == "img2img") != img2img:
            raise UserError(f"{args.replay} was made by {record.get('mode')}: replay it with 'ldm {record.get('mode')}'")
    model = args.model or (recorded_model(record) if record else None)
    options = RuntimeOptions(
        device=args.device,
        dtype=args.dtype or (record["dtype"] if record else "auto"),
        attention_slicing=args.attention_slicing,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        cpu_offload=args.cpu_offload,
        channels_last=args.channels_last,
        compile=args.compile,
        fast=args.fast or bool(record and record.get("fast")),
        allow_pickle=args.allow_pickle,
        model_config=args.model_config or (record["model"].get("config") if record else None),
        lora=args.lora or ([x["path"] for x in record.get("lora", [])] if record else []),
        lora_scale=_lora_scale(args, record),
    )
    from ldm_pipeline.distributed import init_state, shared_random_seed, split_jobs, world_size

    if record is not None:
        if world_size() > 1:
            raise UserError("--replay regenerates one image: run it as one process (without torchrun or accelerate launch)")
        from ldm_pipeline.replay import jobs_from_record

        state, jobs = None, jobs_from_record(record)
        batch_size, keep = len(jobs), {0}
    else:
        state = init_state(options)
        base_seed = args.seed if args.seed not in (None, RANDOM) else shared_random_seed(state)
        jobs = jobs_from_args(args, img2img, base_seed)
        batch_size, keep = args.batch_size, None

    with split_jobs(jobs, outdir, state) as (my_jobs, start_number):
        from ldm_pipeline.generator import ImageGenerator
        from ldm_pipeline.replay import replay_warnings

        gen = ImageGenerator.load(model, options)
        for warning in replay_warnings(record, gen) if record is not None else ():
            print(f"warning: {warning}", file=sys.stderr)
        if gen.fast_plan is not None and not args.quiet and (state is None or state.is_local_main_process):
            print(f"--fast: {gen.fast_plan.describe()}"
                  + (" (the first image waits for the compilation; later runs reuse its cache)"
                     if gen.fast_plan.compile else ""), file=sys.stderr)
        return generate_and_save(gen, my_jobs, args, outdir, start_number, state, batch_size, keep)


def generate_and_save(gen, jobs: list, args: argparse.Namespace, outdir: Path, start_number: int, state,
                      batch_size: int | None = None, keep: set[int] | None = None) -> int:
    """Generate `jobs` and save each image as OUTDIR/NNNNN-SEED.png (only the job indexes in `keep`, if given);
    with --grid, also the grid of the whole run (every rank takes part in gathering it)."""
    from tqdm import tqdm

    from ldm_pipeline.grid import make_grid
    from ldm_pipeline.outputs import save_png

    jobs = [gen.resolve(j) for j in jobs]  # settings errors (size, steps × strength …) before any progress bar
    main_process = state is None or state.is_local_main_process
    for j in jobs:
        if main_process and (start := gen.unguided_start(j)) is not None:
            print(f"warning: the first step (timestep {start}) is already below the guidance cut-off "
                  f"{j.guidance_cutoff:g}: no step is guided, so the CFG scale and the negative prompt have no effect "
                  "(--guidance-cutoff 0 guides every step)", file=sys.stderr)
            break
    show = not args.quiet and main_process
    n_images = len(keep) if keep is not None else len(jobs)
    # counts denoising steps of every image (a batch's step advances each of its images), so a slow image moves
    bar = tqdm(total=sum(gen.step_count(j) for j in jobs), unit="step", desc=f"image 1/{n_images}",
               disable=not show, dynamic_ncols=True, file=sys.stderr)
    saved: list[tuple[int, Path, object]] = []
    try:
        for result in gen.generate(jobs, batch_size=batch_size or args.batch_size, on_step=lambda b: bar.update(len(b))):
            if keep is not None and result.job.index not in keep:
                continue
            name = f"{start_number + result.job.index:05d}-{result.job.seed}.png"
            path = save_png(result.image, outdir / name, result.record)
            saved.append((result.job.index, path, result.image))
            bar.set_description(f"image {min(len(saved) + 1, n_images)}/{n_images}", refresh=False)
            print(path, flush=True)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {len(saved)} finished image(s) kept in {outdir}", file=sys.stderr)
        return 130
    finally:
        bar.close()  # so an error message starts on a line of its own
    if args.grid:
        from ldm_pipeline.distributed import gather_grid_images

        images = gather_grid_images(saved, state)  # a collective: ranks with no images take part too
        if images:
            grid_path = save_png(make_grid(images), outdir / f"grid-{start_number:05d}.png")
            print(grid_path, flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm txt2img") -> int:
    return run_main(lambda a: run(a, img2img=False), build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
