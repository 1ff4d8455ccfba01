"""txt2img and img2img on diffusers' StableDiffusion pipelines: seeds, batching, long/weighted prompts and
classifier-free guidance control, on one loaded model (`ImageGenerator`).

The denoising loop is diffusers' own (``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` built from
the same components); we feed it ``prompt_embeds`` from `ldm_pipeline.prompts`, one CPU ``torch.Generator`` per
image seeded with ``seed + i`` (so an image's noise does not depend on its batch or device), and swap the
scheduler with ``from_config``. Batched convolutions round differently from single ones, so a batched image's
record lists its whole batch and replay regenerates that batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.fast import FastPlan, apply_plan, plan_for
from ldm_pipeline.guidance import CFG_TENSORS, chain_callbacks, guidance_cutoff_callback
from ldm_pipeline.images import load_init_image
from ldm_pipeline.models import GenerationDefaults, ModelInfo, is_xl
from ldm_pipeline.replay import batch_member, lora_record, make_record
from ldm_pipeline.schedulers import check_scheduler_name, check_steps
from ldm_pipeline.settings import (
    DIFFUSERS_SIZE_MULTIPLE,
    RANDOM,
    Job,
    RuntimeOptions,
    check_eta,
    check_img2img_steps,
    check_setting,
    img2img_step_count,
    jobs_from_api,
    random_seed,
    resolve_device,
    torch_dtype,
)


@dataclass
class Result:
    job: Job
    image: Any  # PIL.Image
    record: dict[str, Any]



class NonFiniteImageError(UserError):
    """Sampling produced NaN or infinite values: the image would be black or noise, so it is not saved."""


def check_finite(arrays, batch: list[Job]) -> None:
    """Refuse a batch whose decoded images hold NaN/inf (diffusers would write them as black PNGs)."""
    import numpy as np

    bad = [j for j, a in zip(batch, arrays) if not np.isfinite(a).all()]
    if bad:
        j = bad[0]
        raise NonFiniteImageError(
            f"the image for seed {j.seed} came out as NaN/inf (scheduler {j.scheduler}, {j.num_inference_steps} steps, "
            f"CFG {j.guidance_scale:g}): nothing was saved for it; try another --scheduler or --steps, or --dtype fp32")


class ImageGenerator:
    """A loaded model ready to make images: ``ImageGenerator.load(model).txt2img(prompt)`` (named apart from
    ``torch.Generator``, which seeds each image)."""

    def __init__(self, pipe, info: ModelInfo, options: RuntimeOptions, device: str, fast_plan: FastPlan | None = None):
        import diffusers

        self.pipe = pipe
        self.info = info
        self.options = options
        self.device = device
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self._img2img = None
        self._schedulers: dict[str, Any] = {}
        self._exec_device_cache = None
        self._lora_records: list[dict[str, Any]] | None = None
        self.fast_plan = fast_plan  # what --fast turned on
        self.xl = is_xl(pipe)  # SDXL: two text encoders, pooled embedding and size conditioning
        diffusers.utils.logging.disable_progress_bar()  # our own bar counts images; diffusers' would count steps
        pipe.set_progress_bar_config(disable=True)

    @property
    def defaults(self) -> GenerationDefaults:
        return self.info.defaults

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @classmethod
    def load(cls, model: str | None = None, options: RuntimeOptions | None = None) -> ImageGenerator:
        """Load `model` (see `ldm_pipeline.models.load_pipeline`) onto the device with the requested switches."""
        import torch

        from ldm_pipeline.models import load_pipeline

        options = options or RuntimeOptions()
        device = resolve_device(options.device)
        chosen = None if options.dtype == "auto" else options.dtype
        pipe, info = load_pipeline(
            model, torch_dtype=torch_dtype(chosen or "fp32"), allow_pickle=options.allow_pickle,
            model_config=options.model_config,
        )
        # --fast picks the precision from the device and the model's size (unless --dtype did)
        plan = plan_for(device, chosen, unet_params=pipe.unet.num_parameters()) if options.fast else None
        options = dataclasses.replace(options, dtype=plan.dtype if plan else (chosen or "fp32"))
        dtype = torch_dtype(options.dtype)
        if pipe.unet.dtype != dtype:  # --fast's choice, or a diffusers that ignored the dtype argument
            pipe.to(dtype=dtype)
        for path in options.lora:
            load_lora(pipe, path, allow_pickle=options.allow_pickle)
        if options.lora:
            pipe.fuse_lora(lora_scale=options.lora_scale)
        if options.cpu_offload:
            if device == "cpu":
                raise UserError("--cpu-offload moves models between the GPU and the CPU: it needs --device cuda")
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if options.attention_slicing:
            pipe.enable_attention_slicing()
        if options.vae_slicing:
            pipe.vae.enable_slicing()
        if options.vae_tiling:
            pipe.vae.enable_tiling()
        if options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if options.compile and not options.fast:
            pipe.unet = torch.compile(pipe.unet)
        if plan is not None:
            if options.cpu_offload and plan.compile:
                plan = dataclasses.replace(plan, compile=False)  # offload hooks move weights: nothing to freeze
            apply_plan(pipe, plan, device)
        return cls(pipe, info, options, device, fast_plan=plan)

    # --- settings ---------------------------------------------------------------------------------------------

    def resolve(self, job: Job) -> Job:
        """Fill a job's unset fields from the model's defaults and check them."""
        d = self.defaults
        job = dataclasses.replace(job)
        if job.num_inference_steps is None:
            job.num_inference_steps = d.num_inference_steps
        job.guidance_scale = d.guidance_scale if job.guidance_scale is None else job.guidance_scale
        job.guidance_cutoff = d.guidance_cutoff if job.guidance_cutoff is None else job.guidance_cutoff
        job.scheduler = check_scheduler_name(job.scheduler or d.scheduler)
        if job.seed is None or job.seed == RANDOM:
            job.seed = random_seed()
        img2img = job.init_image is not None
        if img2img and job.strength is None:
            job.strength = 0.75
        names = ["seed", "num_inference_steps", "guidance_scale", "guidance_rescale", "guidance_cutoff", "eta",
                 "clip_skip", "height", "width"] + (["strength", "resize_mode"] if img2img else [])
        for name in names:
            problem = check_setting(name, getattr(job, name))
            if problem:
                raise UserError(f"{name.replace('num_inference_steps', 'steps').replace('_', ' ')} {problem}")
        layers = min(te.config.num_hidden_layers for te in self.text_encoders)
        if job.clip_skip > layers:
            raise UserError(f"clip skip must be 1..{layers} " + ("(SDXL reads the penultimate layer; N reads N-1 layers "
                            "before it)" if self.xl else "(1 = last layer, 2 = penultimate)"))
        self._check_size_conditioning(job)
        if problem := check_eta(job.eta, job.scheduler):
            raise UserError(problem)
        if img2img:
            if problem := check_img2img_steps(job.num_inference_steps, job.strength):
                raise UserError(problem)
        else:
            job.height = job.height or d.height
            job.width = job.width or d.width
        if problem := check_steps(job.scheduler, self._scheduler(job.scheduler), job.num_inference_steps, img2img):
            raise UserError(problem)
        m = self.size_multiple(img2img)
        for name in ("height", "width"):
            v = getattr(job, name)
            if v is not None and v % m:
                why = (f"this model's VAE factor {m}" if img2img or m == self.vae_scale_factor
                       else f"txt2img needs multiples of both this model's VAE factor {self.vae_scale_factor} and "
                       f"diffusers' {DIFFUSERS_SIZE_MULTIPLE}")
                raise UserError(f"--{name} {v} is not a multiple of {m} ({why})")
        return job

    def _check_size_conditioning(self, job: Job) -> None:
        given = {"original size": job.original_size, "target size": job.target_size,
                 "crop top-left": job.crop_top_left}
        given = {k: v for k, v in given.items() if v is not None}
        if given and not self.xl:
            raise UserError(f"{next(iter(given))} is SDXL size conditioning, which this SD 1.x/2.x model does not take: "
                            "leave it out")
        for name, value in given.items():
            low = 0 if name == "crop top-left" else 1
            if len(value) != 2 or any(int(v) != v or v < low for v in value):
                raise UserError(f"{name} must be two whole numbers >= {low} (got {value})")

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder] + ([self.pipe.text_encoder_2] if self.xl else [])

    def size_multiple(self, img2img: bool) -> int:
        """What --height/--width must be a multiple of: the VAE factor for img2img (diffusers' image processor
        works in VAE-factor steps), and also 8 for txt2img (``StableDiffusionPipeline.check_inputs``)."""
        f = self.vae_scale_factor
        return f if img2img else math.lcm(f, DIFFUSERS_SIZE_MULTIPLE)

    def _scheduler(self, name: str):
        from ldm_pipeline.schedulers import make_scheduler

        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.base_scheduler_config)
        return self._schedulers[name]

    @property
    def img2img_pipe(self):
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

            if self.xl:
                self._img2img = StableDiffusionXLImg2ImgPipeline(
                    **self.pipe.components, add_watermarker=False,
                    force_zeros_for_empty_prompt=self.pipe.config.force_zeros_for_empty_prompt)
            else:
                self._img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    # --- generation -------------------------------------------------------------------------------------------

    def encode(self, job: Job, num_chunks: int | None = None) -> tuple:
        """(prompt_embeds, negative_prompt_embeds), optionally padded to `num_chunks` chunks; SDXL adds the pooled
        embeddings of both."""
        from ldm_pipeline.prompts import encode_prompt_pair, encode_prompt_pair_xl

        if self.xl:
            return encode_prompt_pair_xl(
                [self.pipe.tokenizer, self.pipe.tokenizer_2], self.text_encoders, job.prompt, job.negative_prompt,
                clip_skip=job.clip_skip, device=self._exec_device, num_chunks=num_chunks,
                zero_empty_negative=bool(self.pipe.config.get("force_zeros_for_empty_prompt", False)))
        return encode_prompt_pair(
            self.pipe.tokenizer,
            self.pipe.text_encoder,
            job.prompt,
            job.negative_prompt,
            clip_skip=job.clip_skip,
            device=self._exec_device,
            num_chunks=num_chunks,
        )

    @property
    def _exec_device(self):
        # pipe._execution_device walks every module (~4 ms a call on the tiny model); it cannot change after load
        if self._exec_device_cache is None:
            self._exec_device_cache = self.pipe._execution_device
        return self._exec_device_cache

    def _batch_key(self, job: Job) -> tuple:
        from ldm_pipeline.prompts import count_chunks

        tok = self.pipe.tokenizer
        chunks = max(count_chunks(tok, job.prompt), count_chunks(tok, job.negative_prompt))
        fields = dataclasses.asdict(job)
        for k in ("prompt", "negative_prompt", "seed", "index", "init_image"):
            fields.pop(k)
        return (chunks, tuple(sorted(fields.items())))

    def batches(self, jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
        """Consecutive jobs sharing every setting (and prompt-chunk count) grouped into batches. Each image's noise
        comes from its own generator and its prompt is padded the same, so a batched image is its single-image
        counterpart up to float rounding (batched convolutions and matmuls may round differently: ±1/255 in a few
        pixels); its record names the whole batch, so `--replay` regenerates it bit for bit."""
        batch: list[Job] = []
        key = None
        for job in jobs:
            k = self._batch_key(job)
            if batch and (k != key or len(batch) >= batch_size):
                yield batch
                batch = []
            key = k
            batch.append(job)
        if batch:
            yield batch

    def run_batch(self, batch: list[Job], init_images: list | None = None, on_step=None) -> list[Result]:
        """Generate one batch of resolved jobs (same settings) → one Result per job; a batch that comes out NaN or
        infinite is a `NonFiniteImageError` (nothing is returned for it, so nothing of it is saved)."""
        import torch

        first = batch[0]
        embeds = [self.encode(j) for j in batch]
        prompt_embeds = torch.cat([e[0] for e in embeds])
        negative_embeds = torch.cat([e[1] for e in embeds])
        xl_inputs = {}
        if self.xl:
            xl_inputs = dict(pooled_prompt_embeds=torch.cat([e[2] for e in embeds]),
                             negative_pooled_prompt_embeds=torch.cat([e[3] for e in embeds]),
                             original_size=first.original_size, target_size=first.target_size,
                             crops_coords_top_left=first.crop_top_left or (0, 0))
        generators = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
        img2img = first.init_image is not None
        pipe = self.img2img_pipe if img2img else self.pipe
        pipe.scheduler = self._scheduler(first.scheduler)
        guidance, callbacks, tensor_inputs = first.guidance_scale, [], []
        if self.unguided_start(first) is not None:  # every step is below the cut-off: no guided step
            guidance = 1.0
        elif first.guidance_cutoff and guidance > 1:
            threshold = first.guidance_cutoff * pipe.scheduler.config.num_train_timesteps
            callbacks.append(guidance_cutoff_callback(threshold))
            tensor_inputs += [name for name in CFG_TENSORS if name in pipe._callback_tensor_inputs]
        if on_step is not None:
            def report(_pipe, _i, _t, kwargs: dict) -> dict:
                on_step(batch)
                return kwargs

            callbacks.append(report)
        callback = {}
        if callbacks:
            callback = dict(callback_on_step_end=chain_callbacks(callbacks), callback_on_step_end_tensor_inputs=tensor_inputs)
        common = dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=guidance,
            guidance_rescale=first.guidance_rescale,
            eta=first.eta,
            generator=generators,
            output_type="np",  # checked for NaN/inf, then made PIL as diffusers' "pil" output does
            **callback,
            **xl_inputs,
        )
        if img2img:
            arrays = pipe(image=init_images, strength=first.strength, **common).images
        else:
            arrays = pipe(height=first.height, width=first.width, **common).images
        check_finite(arrays, batch)
        images = pipe.image_processor.numpy_to_pil(arrays)
        members = [batch_member(m) for m in batch] if len(batch) > 1 else None  # once per batch: hashes init images
        results = []
        for pos, (j, im) in enumerate(zip(batch, images)):
            rec = self.record(j, im)
            if members:
                rec["batch"] = {"size": len(batch), "position": pos, "members": members}
            results.append(Result(j, im, rec))
        return results

    def run_timesteps(self, job: Job):
        """The timesteps a resolved job's denoising loop runs, one per UNet pass of the pipeline's loop: a
        second-order sampler repeats them, img2img runs only the tail (diffusers' ``get_timesteps``)."""
        sched = self._scheduler(job.scheduler)
        steps = job.num_inference_steps
        sched.set_timesteps(steps)
        skipped = steps - img2img_step_count(steps, job.strength) if job.init_image is not None else 0
        return sched.timesteps[skipped * sched.order:]

    def step_count(self, job: Job) -> int:
        """Denoising steps a resolved job runs (what the progress bar counts)."""
        return len(self.run_timesteps(job))

    def unguided_start(self, job: Job) -> int | None:
        """The timestep of a resolved job's first denoising step when its guidance cut-off leaves no step guided
        (img2img starts part-way, see diffusers' ``get_timesteps``: at strength 0.3, near t = 300), else None."""
        if not job.guidance_cutoff or job.guidance_scale <= 1:
            return None
        first = int(self.run_timesteps(job)[0])
        threshold = job.guidance_cutoff * self._scheduler(job.scheduler).config.num_train_timesteps
        return first if first < threshold else None

    @property
    def lora_records(self) -> list[dict[str, Any]]:
        """The LoRAs as each image's record names them; hashed once per load, not once per image."""
        if self._lora_records is None:
            self._lora_records = [lora_record(p) for p in self.options.lora]
        return [dict(r) for r in self._lora_records]  # each record its own copy

    def generate(self, jobs: Iterable[Job], batch_size: int = 1, on_step=None) -> Iterator[Result]:
        """Resolve, batch and run jobs, yielding each Result as soon as its batch is done. `on_step(batch)` is
        called after each denoising step (a progress bar's hook; `step_count` says how many a job has)."""
        if problem := check_setting("batch_size", batch_size):
            raise UserError(f"batch size {problem}")
        resolved = [self.resolve(j) for j in jobs]
        for batch in self.batches(resolved, batch_size):
            init_images = None
            if batch[0].init_image is not None:
                init_images = []
                for j in batch:
                    im, size = load_init_image(j.init_image, j.height, j.width, j.resize_mode, self.vae_scale_factor)
                    j.width, j.height = size
                    init_images.append(im)
                # images of different sizes cannot share a batch
                groups: dict[tuple, list[int]] = {}
                for i, j in enumerate(batch):
                    groups.setdefault((j.width, j.height), []).append(i)
                for idx in groups.values():
                    yield from self.run_batch([batch[i] for i in idx], [init_images[i] for i in idx], on_step)
            else:
                yield from self.run_batch(batch, on_step=on_step)

    def txt2img(self, prompt: str | list[str], **settings) -> list:
        """Python API: images for one or more prompts (settings as in `Job`, plus ``num_images``, ``batch_size``)."""
        return [r.image for r in self.generate(jobs_from_api(prompt, settings), settings.get("batch_size", 1))]

    def img2img(self, prompt: str | list[str], init_image: str, **settings) -> list:
        """Python API: edit `init_image` (a path) with `prompt`; settings as for `txt2img` plus ``strength``."""
        settings["init_image"] = str(init_image)
        return [r.image for r in self.generate(jobs_from_api(prompt, settings), settings.get("batch_size", 1))]

    def record(self, job: Job, image) -> dict[str, Any]:
        """Everything needed to regenerate this image (the JSON chunk of its PNG): see `ldm_pipeline.replay`."""
        return make_record(self, job, image)


Generator = ImageGenerator  # the name before 0.2; kept so existing scripts run


def replay_image(path: str | Path, model: str | None = None, **runtime):
    """The image recorded in PNG `path`, made again (a PIL image); `model` overrides the recorded one, `runtime`
    sets `RuntimeOptions` fields (device, memory switches). Warnings about what differs go to stderr.

        image = replay_image("outputs/txt2img/00003-45.png")   # the same pixels, on the same device type and dtype
    """
    import sys

    from ldm_pipeline.replay import jobs_from_record, read_record, recorded_model, replay_warnings, runtime_options

    record = read_record(path)
    jobs = jobs_from_record(record)
    gen = ImageGenerator.load(model or recorded_model(record), runtime_options(record, **runtime))
    for warning in replay_warnings(record, gen):
        print(f"warning: {warning}", file=sys.stderr)
    return next(r.image for r in gen.generate(jobs, batch_size=len(jobs)) if r.job.index == 0)


def load_lora(pipe, path: str, allow_pickle: bool = False) -> None:
    """Load LoRA weights saved by ``ldm train --lora-rank`` (diffusers' load_lora_weights format); pickle weights
    (.bin/.pt/.ckpt) only with `allow_pickle`."""
    from ldm_pipeline.models import PICKLE_SUFFIXES

    p = Path(path)
    if not p.exists():
        raise UserError(f"LoRA not found: {path}")
    files = list(p.iterdir()) if p.is_dir() else [p]
    if not allow_pickle and not any(f.suffix == ".safetensors" for f in files) and any(
        f.suffix.lower() in PICKLE_SUFFIXES for f in files
    ):
        raise UserError(f"LoRA {path} has only pickle weights, which can run arbitrary code when loaded: convert them "
                        "to .safetensors, or pass --allow-pickle")
    kwargs = {} if allow_pickle else {"use_safetensors": True}
    try:
        if p.is_dir():
            pipe.load_lora_weights(str(p), adapter_name=f"lora{len(pipe.get_list_adapters() or {})}", **kwargs)
        else:
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, **kwargs)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"cannot load LoRA {path}: {str(e).splitlines()[0][:200]}") from None
