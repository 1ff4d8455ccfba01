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


def check_args(args: argparse.Namespace, img2img: bool) -> None:
    """Argument errors that need no model (fast failures, before the heavy imports)."""
    sources = sum(bool(x) for x in (args.prompt, args.from_file, args.replay))
    if sources == 0:
        raise UserError("no prompt: pass a prompt, --from-file FILE or --replay IMAGE.png")
    if sources > 1:
        raise UserError("pass only one of: prompt arguments, --from-file, --replay")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1 (got {args.num_images})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UserError(f"--{name} must be positive (got {v})")
    if img2img:
        if not 0 < args.strength <= 1:
            raise UserError(f"--strength must be in (0, 1] (got {args.strength})")
        if not args.init_image and not args.replay and not args.from_file:
            raise UserError("img2img needs --init-image (a file, folder or glob)")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance-scale must be >= 0 (got {args.guidance_scale})")


def jobs_from_args(args: argparse.Namespace, img2img: bool) -> list:
    """Expand prompts × images (× init images) into Jobs; image i of the run gets seed + i."""
    from ldm_pipeline.pipeline import MAX_SEED, Job, check_image_readable, expand_image_paths, random_seed
    from ldm_pipeline.prompts import read_prompt_file

    rows = read_prompt_file(args.from_file) if args.from_file else [{"prompt": p} for p in args.prompt]
    for r in rows:
        if not r["prompt"].strip():
            raise UserError("empty prompt: give some text (use --negative-prompt for what to avoid)")
    base_seed = args.seed if args.seed is not None else random_seed()
    run = dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        scheduler=args.scheduler,
        eta=args.eta,
        height=args.height,
        width=args.width,
        clip_skip=args.clip_skip,
    )
    if img2img:
        run.update(strength=args.strength, resize_mode=args.resize_mode)
    jobs = []
    for row in rows:
        row = dict(row)
        n = row.pop("num_images", args.num_images)
        row_seed = row.pop("seed", None)
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
                seed = (row_seed + k) if row_seed is not None else (base_seed + i) % (MAX_SEED + 1)
                jobs.append(Job(**{**run, **row}, seed=seed, init_image=init, index=i))
    return jobs


def job_from_record(record: dict, args: argparse.Namespace):
    from ldm_pipeline.pipeline import Job

    keys = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "guidance_rescale",
            "scheduler", "eta", "clip_skip", "strength", "init_image", "resize_mode")
    job = Job(**{k: record[k] for k in keys if k in record})
    if record.get("mode") == "txt2img":
        job.height, job.width = record["height"], record["width"]
    else:
        job.height, job.width = record["height"], record["width"]
        if not Path(job.init_image).is_file():
            raise UserError(f"replay needs the init image {job.init_image}, which is not there")
        from ldm_pipeline.models import file_sha256

        if file_sha256(job.init_image) != record.get("init_image_sha256"):
            raise UserError(f"init image {job.init_image} has changed since the image was made; replay needs the original")
    return job


def run(args: argparse.Namespace, img2img: bool = False) -> int:
    check_args(args, img2img)
    from ldm_pipeline.pipeline import RuntimeOptions, check_outdir

    outdir = Path(args.outdir)
    check_outdir(outdir)
    record = None
    if args.replay:
        from ldm_pipeline.metadata import read_record

        record = read_record(args.replay)
        if (record.get("mode") == "img2img") != img2img:
            raise UserError(f"{args.replay} was made by {record.get('mode')}: replay it with 'ldm {record.get('mode')}'")
    model = args.model or (record["model"]["path"] or record["model"]["name"] if record else None)
    options = RuntimeOptions(
        device=args.device,
        dtype=args.dtype or (record["dtype"] if record else "fp32"),
        attention_slicing=args.attention_slicing,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        cpu_offload=args.cpu_offload,
        channels_last=args.channels_last,
        compile=args.compile,
        allow_pickle=args.allow_pickle,
        model_config=args.model_config or (record["model"].get("config") if record else None),
        lora=args.lora or ([x["path"] for x in record.get("lora", [])] if record else []),
        lora_scale=args.lora_scale if args.lora else (record.get("lora_scale") or 1.0 if record else 1.0),
    )
    if record is not None:
        jobs = [job_from_record(record, args)]
    else:
        jobs = jobs_from_args(args, img2img)

    from ldm_pipeline.distributed import split_jobs

    with split_jobs(jobs, outdir, options) as (my_jobs, start_number, state):
        from ldm_pipeline.pipeline import Generator

        gen = Generator.load(model, options)
        if record is not None and record["model"]["hash"] != gen.info.hash:
            print(f"warning: model hash {gen.info.hash} differs from the recorded {record['model']['hash']}", file=sys.stderr)
        return generate_and_save(gen, my_jobs, args, outdir, start_number, state)


def generate_and_save(gen, jobs: list, args: argparse.Namespace, outdir: Path, start_number: int, state) -> int:
    from tqdm import tqdm

    from ldm_pipeline.pipeline import make_grid, save_png

    show = not args.quiet and (state is None or state.is_local_main_process)
    bar = tqdm(total=len(jobs), unit="img", desc="generating", disable=not show, dynamic_ncols=True, file=sys.stderr)
    saved: list[tuple[int, Path, object]] = []
    try:
        for result in gen.generate(jobs, batch_size=args.batch_size):
            name = f"{start_number + result.job.index:05d}-{result.job.seed}.png"
            path = save_png(result.image, outdir / name, result.record)
            saved.append((result.job.index, path, result.image))
            print(path, flush=True)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {len(saved)} finished image(s) kept in {outdir}", file=sys.stderr)
        return 130
    finally:
        bar.close()  # so an error message starts on a line of its own
    if args.grid and saved:
        from ldm_pipeline.distributed import gather_grid_images

        images = gather_grid_images(saved, state)
        if images is not None:
            grid_path = save_png(make_grid(images), outdir / f"grid-{start_number:05d}.png")
            print(grid_path, flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "ldm txt2img") -> int:
    return run_main(lambda a: run(a, img2img=False), build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
