"""txt2img and img2img on diffusers' StableDiffusion pipelines: seeds, batching, long/weighted prompts, metadata,
replay, and splitting the work across processes.

The denoising loop is diffusers' own (``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` built from
the same components); we feed it ``prompt_embeds`` from `ldm_pipeline.prompts`, one CPU ``torch.Generator`` per
image seeded with ``seed + i`` (so an image's noise does not depend on its batch or device), and swap the
scheduler with ``from_config``. Batched convolutions round differently from single ones, so a batched image's
record lists its whole batch and replay regenerates that batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.models import GenerationDefaults, ModelInfo
from ldm_pipeline.schedulers import ETA_SCHEDULERS, SCHEDULERS, check_scheduler_name

RESIZE_MODES = ("crop", "pad", "stretch")
DTYPES = ("fp32", "fp16", "bf16")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes; seeds wrap around past it
RANDOM_SEED_MAX = 2**32 - 1  # random seeds are drawn below this (A1111's range: short file names)
RANDOM = -1  # --seed -1 / "seed": -1 means "draw one" (the A1111 convention)
DIFFUSERS_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs wants height and width divisible by 8


@dataclass
class Job:
    """One image to make. Fields left None take the run's settings, then the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    guidance_cutoff: float | None = None  # CFG only at timesteps >= this fraction of the schedule (0 = every step)
    scheduler: str | None = None
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    clip_skip: int = 1
    # img2img only
    init_image: str | None = None
    strength: float | None = None
    resize_mode: str = "crop"
    index: int = 0  # position in the run (decides the output number)


@dataclass
class Result:
    job: Job
    image: Any  # PIL.Image
    record: dict[str, Any]


@dataclass
class RuntimeOptions:
    """How to run (not what to draw): device, precision and diffusers' memory/speed switches."""

    device: str = "auto"
    dtype: str = "fp32"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    channels_last: bool = False
    compile: bool = False
    allow_pickle: bool = False
    model_config: str | None = None  # architecture of a single-file checkpoint (folder or configs/models name)
    lora: list[str] = field(default_factory=list)
    lora_scale: float = 1.0


def resolve_device(name: str) -> str:
    """``auto`` → the best device here; anything else is checked to exist (a one-line UserError, not a traceback
    from ``pipe.to``)."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(f"unknown --device {name}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    if kind == "mps" and not mps:
        raise UserError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    return name


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise UserError(f"unknown --dtype {name}: use fp32, fp16 or bf16") from None


def random_seed() -> int:
    return random.SystemRandom().randint(0, RANDOM_SEED_MAX)


def wrap_seed(seed: int) -> int:
    """seed + i past MAX_SEED wraps to 0, so every image of a run has a seed torch accepts."""
    return seed % (MAX_SEED + 1)


def check_setting(name: str, value: Any) -> str | None:
    """What is wrong with one generation setting, or None: the single rule set behind the command-line flags,
    prompt-file rows and `Generator.resolve` (callers add the flag name or the file line)."""
    if value is None:
        return None
    if name in ("num_inference_steps", "num_images", "batch_size", "clip_skip") and value < 1:
        return f"must be at least 1 (got {value})"
    if name in ("height", "width") and value <= 0:
        return f"must be positive (got {value})"
    if name == "guidance_scale" and value < 0:
        return f"must be >= 0 (got {value})"
    if name in ("guidance_rescale", "guidance_cutoff") and not 0 <= value <= 1:
        return f"must be in [0, 1] (got {value})"
    if name == "eta" and value < 0:
        return f"must be >= 0 (got {value})"
    if name == "strength" and not 0 < value <= 1:
        return f"must be in (0, 1] (got {value})"
    if name == "seed" and value != RANDOM and not 0 <= value <= MAX_SEED:
        return f"must be {RANDOM} (random) or 0..{MAX_SEED} (got {value})"
    if name == "resize_mode" and value not in RESIZE_MODES:
        return f"must be one of {', '.join(RESIZE_MODES)} (got {value})"
    return None


def check_eta(eta: float | None, scheduler: str | None) -> str | None:
    """--eta only means something to DDIM (diffusers' other schedulers, DDPM included, ignore it)."""
    if eta and scheduler is not None and scheduler not in ETA_SCHEDULERS:
        return f"--eta applies to the {' and '.join(ETA_SCHEDULERS)} scheduler only, not {scheduler}"
    return None


def img2img_step_count(steps: int, strength: float) -> int:
    """Denoising steps diffusers' img2img runs: ``int(steps * strength)`` (its ``get_timesteps``)."""
    return min(int(steps * strength), steps)


def check_img2img_steps(steps: int, strength: float) -> str | None:
    """img2img with ``int(steps * strength) == 0`` would run no step at all (diffusers then fails with a
    RuntimeError): say which values work instead of silently changing the strength."""
    if img2img_step_count(steps, strength) >= 1:
        return None
    more = math.ceil(1 / strength)
    while img2img_step_count(more, strength) < 1:
        more += 1
    return (f"strength {strength:g} × {steps} steps leaves no denoising step (img2img runs int(steps × strength) "
            f"steps): use --strength {1 / steps:g} or more, or --steps {more} or more")


def guidance_cutoff_callback(threshold: float):
    """A ``callback_on_step_end`` that switches classifier-free guidance off for the steps at timesteps below
    `threshold`: those steps run the conditional pass alone (and the negative prompt no longer applies), as in
    A1111's "negative guidance minimum sigma" and Kynkäänniemi et al. 2024's guidance interval. Strong guidance
    decides colour and layout at high noise; at low noise it over-sharpens outlines (squares come out pinched).
    The step that the callback ends decides the next one; the caller handles a first step below the threshold."""

    # our own: diffusers' SDCFGCutoffCallback counts steps (an img2img run, which starts part-way, would switch at
    # another noise level) and keeps only the last prompt's embedding of a batch
    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        run = pipe.scheduler.timesteps[-pipe.num_timesteps:]  # the steps this call runs (img2img: the tail)
        if pipe.do_classifier_free_guidance and i + 1 < len(run) and run[i + 1] < threshold:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[1]  # [negative; positive] → positive
            pipe._guidance_scale = 1.0
        return kwargs

    return callback


def _chain(callbacks: list):
    """Several ``callback_on_step_end`` functions as one (diffusers takes a single callable)."""

    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        for cb in callbacks:
            kwargs = cb(pipe, i, t, kwargs)
        return kwargs

    return callback


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


class Generator:
    """A loaded model ready to make images: ``Generator.load(model).txt2img(jobs)``."""

    def __init__(self, pipe, info: ModelInfo, options: RuntimeOptions, device: str):
        import diffusers

        self.pipe = pipe
        self.info = info
        self.options = options
        self.device = device
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self._img2img = None
        self._schedulers: dict[str, Any] = {}
        self._exec_device_cache = None
        diffusers.utils.logging.disable_progress_bar()  # our own bar counts images; diffusers' would count steps
        pipe.set_progress_bar_config(disable=True)

    @property
    def defaults(self) -> GenerationDefaults:
        return self.info.defaults

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @classmethod
    def load(cls, model: str | None = None, options: RuntimeOptions | None = None) -> Generator:
        """Load `model` (see `ldm_pipeline.models.load_pipeline`) onto the device with the requested switches."""
        import torch

        from ldm_pipeline.models import load_pipeline

        options = options or RuntimeOptions()
        device = resolve_device(options.device)
        dtype = torch_dtype(options.dtype)
        pipe, info = load_pipeline(
            model, torch_dtype=dtype, allow_pickle=options.allow_pickle, model_config=options.model_config
        )
        if pipe.unet.dtype != dtype:  # a diffusers that ignored the dtype argument: cast, so the record is true
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
        if options.compile:
            pipe.unet = torch.compile(pipe.unet)
        return cls(pipe, info, options, device)

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
        layers = self.pipe.text_encoder.config.num_hidden_layers
        if job.clip_skip > layers:
            raise UserError(f"clip skip must be 1..{layers} (1 = last layer, 2 = penultimate)")
        if problem := check_eta(job.eta, job.scheduler):
            raise UserError(problem)
        if img2img:
            if problem := check_img2img_steps(job.num_inference_steps, job.strength):
                raise UserError(problem)
        else:
            job.height = job.height or d.height
            job.width = job.width or d.width
        m = self.size_multiple(img2img)
        for name in ("height", "width"):
            v = getattr(job, name)
            if v is not None and v % m:
                why = (f"this model's VAE factor {m}" if img2img or m == self.vae_scale_factor
                       else f"txt2img needs multiples of both this model's VAE factor {self.vae_scale_factor} and "
                       f"diffusers' {DIFFUSERS_SIZE_MULTIPLE}")
                raise UserError(f"--{name} {v} is not a multiple of {m} ({why})")
        return job

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
            from diffusers import StableDiffusionImg2ImgPipeline

            self._img2img = StableDiffusionImg2ImgPipeline(**self.pipe.components, requires_safety_checker=False)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    # --- generation -------------------------------------------------------------------------------------------

    def encode(self, job: Job, num_chunks: int | None = None):
        """(prompt_embeds, negative_prompt_embeds) for a job, optionally padded to `num_chunks` chunks."""
        from ldm_pipeline.prompts import encode_prompt_pair

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
            tensor_inputs.append("prompt_embeds")
        if on_step is not None:
            def report(_pipe, _i, _t, kwargs: dict) -> dict:
                on_step(batch)
                return kwargs

            callbacks.append(report)
        callback = {}
        if callbacks:
            callback = dict(callback_on_step_end=_chain(callbacks), callback_on_step_end_tensor_inputs=tensor_inputs)
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
        )
        if img2img:
            arrays = pipe(image=init_images, strength=first.strength, **common).images
        else:
            arrays = pipe(height=first.height, width=first.width, **common).images
        check_finite(arrays, batch)
        images = pipe.image_processor.numpy_to_pil(arrays)
        members = [_member(m) for m in batch] if len(batch) > 1 else None  # once per batch: it hashes init images
        results = []
        for pos, (j, im) in enumerate(zip(batch, images)):
            rec = self.record(j, im)
            if members:
                rec["batch"] = {"size": len(batch), "position": pos, "members": members}
            results.append(Result(j, im, rec))
        return results

    def step_count(self, job: Job) -> int:
        """Denoising steps (UNet passes of the pipeline's loop) a resolved job runs: a second-order sampler runs
        about twice its --steps, img2img only its tail (diffusers' ``get_timesteps``)."""
        sched = self._scheduler(job.scheduler)
        sched.set_timesteps(job.num_inference_steps)
        total = len(sched.timesteps)
        if job.init_image is not None:
            skipped = job.num_inference_steps - img2img_step_count(job.num_inference_steps, job.strength)
            total -= skipped * sched.order
        return total

    def unguided_start(self, job: Job) -> int | None:
        """The timestep of a resolved job's first denoising step when its guidance cut-off leaves no step guided
        (img2img starts part-way, see diffusers' ``get_timesteps``: at strength 0.3, near t = 300), else None."""
        if not job.guidance_cutoff or job.guidance_scale <= 1:
            return None
        sched = self._scheduler(job.scheduler)
        steps = job.num_inference_steps
        sched.set_timesteps(steps)
        skipped = steps - img2img_step_count(steps, job.strength) if job.init_image is not None else 0
        first = int(sched.timesteps[skipped * sched.order])
        return first if first < job.guidance_cutoff * sched.config.num_train_timesteps else None

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
        return [r.image for r in self.generate(_jobs_from_api(prompt, settings), settings.get("batch_size", 1))]

    def img2img(self, prompt: str | list[str], init_image: str, **settings) -> list:
        """Python API: edit `init_image` (a path) with `prompt`; settings as for `txt2img` plus ``strength``."""
        settings["init_image"] = str(init_image)
        return [r.image for r in self.generate(_jobs_from_api(prompt, settings), settings.get("batch_size", 1))]

    # --- metadata ---------------------------------------------------------------------------------------------

    def record(self, job: Job, image) -> dict[str, Any]:
        """Everything needed to regenerate this image (the JSON chunk of its PNG)."""
        import diffusers
        import torch
        import transformers

        import ldm_pipeline

        rec = {
            "mode": "img2img" if job.init_image is not None else "txt2img",
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seed,
            "num_inference_steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "guidance_rescale": job.guidance_rescale,
            "guidance_cutoff": job.guidance_cutoff,
            "scheduler": job.scheduler,
            "sampler_name": SCHEDULERS[job.scheduler].a1111_name,
            "scheduler_config": _jsonable(dict(self._scheduler(job.scheduler).config)),
            "eta": job.eta,
            "clip_skip": job.clip_skip,
            "width": image.width,
            "height": image.height,
            "model": {
                "name": self.info.name,
                "source": self.info.source,
                "hash": self.info.hash,
                "path": self.info.path,
                "config": self.options.model_config,
            },
            "lora": [lora_record(p) for p in self.options.lora],
            "lora_scale": self.options.lora_scale if self.options.lora else None,
            "dtype": self.options.dtype,
            "device_type": self.device.split(":")[0],
            "versions": {
                "ldm_pipeline": ldm_pipeline.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }
        if job.init_image is not None:
            from ldm_pipeline.models import file_sha256

            rec.update(
                strength=job.strength,
                init_image=str(Path(job.init_image).resolve()),
                init_image_sha256=file_sha256(job.init_image),
                resize_mode=job.resize_mode,
            )
        return rec


def _member(job: Job) -> dict[str, Any]:
    """What differs between the images of one batch (everything else is shared): enough to rebuild the batch."""
    m = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed}
    if job.init_image is not None:
        from ldm_pipeline.models import file_sha256

        m.update(init_image=str(Path(job.init_image).resolve()), init_image_sha256=file_sha256(job.init_image))
    return m


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


def _path_hash(path: str) -> str:
    from ldm_pipeline.models import file_sha256, folder_hash

    p = Path(path)
    return (folder_hash(p) if p.is_dir() else file_sha256(p))[:10]


def lora_record(path: str) -> dict[str, Any]:
    """A LoRA as the PNG records it: its path and hash (replay), and the name and AutoV3 hash A1111 writes in
    ``<lora:NAME:W>`` and ``Lora hashes``."""
    from ldm_pipeline.models import display_name

    p = Path(path).resolve()
    weights = p
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        weights = files[0] if files else None
    if weights is None or weights.stem == "pytorch_lora_weights":  # diffusers' default file name says nothing
        name = display_name(p if p.is_dir() else p.parent)
    else:
        name = weights.stem
    rec = {"path": str(p), "hash": _path_hash(path), "name": name}
    if weights is not None and weights.suffix == ".safetensors":
        rec["autov3"] = safetensors_autov3(weights)[:12]
    return rec


def safetensors_autov3(path: Path) -> str:
    """A1111's LoRA hash ("AutoV3", kohya's addnet hash): sha256 of a .safetensors file after its JSON header, so
    editing the metadata does not change it."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# diffusers' bookkeeping of which config values were defaulted: a list built from a set, so its order changes from
# one process to the next; it says nothing about the image
_UNRECORDED_CONFIG_KEYS = ("_use_default_values",)


def _jsonable(d: dict) -> dict:
    """A scheduler config as strict JSON (no NaN/Infinity: JavaScript's JSON.parse refuses them) that is the same
    bytes in every process."""
    out = {}
    for k, v in d.items():
        if k in _UNRECORDED_CONFIG_KEYS:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)  # "inf", "-inf", "nan"
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def _jobs_from_api(prompt: str | list[str], settings: dict[str, Any]) -> list[Job]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    settings = dict(settings)
    num = settings.pop("num_images", 1)
    settings.pop("batch_size", None)
    seed = settings.pop("seed", None)
    for name, value in (("num_images", num), ("seed", seed)):
        if problem := check_setting(name, value):
            raise UserError(f"{name} {problem}")
    if seed is None or seed == RANDOM:
        seed = random_seed()
    jobs = []
    for p in prompts:
        for _ in range(num):
            jobs.append(Job(prompt=p, seed=wrap_seed(seed + len(jobs)), index=len(jobs), **settings))
    return jobs


# --- init images --------------------------------------------------------------------------------------------


def expand_image_paths(spec: str) -> list[str]:
    """A file, a folder (its images, sorted) or a glob → image paths; a UserError when nothing matches."""
    import glob

    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
    p = Path(spec).expanduser()
    if p.is_dir():
        paths = sorted(str(x) for x in p.iterdir() if x.suffix.lower() in exts)
        if not paths:
            raise UserError(f"no images in folder {spec} (looked for {', '.join(exts)})")
        return paths
    if p.is_file():
        return [str(p)]
    if any(c in spec for c in "*?["):
        paths = sorted(x for x in glob.glob(os.path.expanduser(spec)) if Path(x).suffix.lower() in exts)
        if not paths:
            raise UserError(f"no images match {spec}")
        return paths
    raise UserError(f"init image not found: {spec}")


def check_image_readable(path: str) -> None:
    """Fail early (before any model loads) on a missing or non-image init image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read init image {path}: {str(e).splitlines()[0][:200]}") from None


def load_init_image(path: str, height: int | None, width: int | None, mode: str, factor: int):
    """Open an init image (EXIF-rotated, RGB) and fit it to (width, height), or to its own size rounded to the VAE
    factor when no size is given; returns (image, (width, height))."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read init image {path}: {str(e).splitlines()[0][:200]}") from None
    if width is None or height is None:
        w, h = im.size
        rnd = {"crop": math.floor, "pad": math.ceil, "stretch": round}[mode]
        tw = width or max(factor, rnd(w / factor) * factor)
        th = height or max(factor, rnd(h / factor) * factor)
    else:
        tw, th = width, height
    return fit_image(im, tw, th, mode), (tw, th)


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[-1])
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        a = (a / max(a.max(), 1) * 255).round().astype("uint8")
        return Image.fromarray(a).convert("RGB")
    return im.convert("RGB")


def fit_image(im, width: int, height: int, mode: str):
    """Resize to exactly (width, height): ``crop`` fills and centre-crops, ``pad`` fits and pads with the edge
    colour mean, ``stretch`` ignores the aspect ratio."""
    from PIL import Image

    if im.size == (width, height):
        return im
    if mode == "stretch":
        return im.resize((width, height), Image.LANCZOS)
    w, h = im.size
    if mode == "crop":
        s = max(width / w, height / h)
        nw, nh = max(width, round(w * s)), max(height, round(h * s))
        im = im.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - width) // 2, (nh - height) // 2
        return im.crop((left, top, left + width, top + height))
    s = min(width / w, height / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    im = im.resize((nw, nh), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), _edge_colour(im))
    canvas.paste(im, ((width - nw) // 2, (height - nh) // 2))
    return canvas


def _edge_colour(im) -> tuple[int, int, int]:
    import numpy as np

    a = np.asarray(im)
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(x) for x in edge.mean(axis=0).round())


# --- outputs ------------------------------------------------------------------------------------------------


def next_number(outdir: Path) -> int:
    """1 + the highest NNNNN prefix of files in `outdir` (so numbering continues after existing images)."""
    best = -1
    if outdir.is_dir():
        for p in outdir.iterdir():
            head = p.name.split("-", 1)[0].split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


def save_png(image, path: Path, record: dict[str, Any] | None = None) -> Path:
    """Write atomically and never overwrite: a temporary file, then a hard link to a free name (the next number
    up if `path` was taken meanwhile). Where the filesystem has no hard links (FAT, some network and FUSE
    mounts), the free name is claimed with an exclusive create and the finished file renamed over it. Returns
    the final path; a failed write (disk full, permissions) is a UserError naming the path."""
    from ldm_pipeline.metadata import png_info

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    final = path
    try:
        image.save(tmp, format="PNG", pnginfo=png_info(record) if record else None)
        use_link = True
        while True:
            try:
                if use_link:
                    os.link(tmp, final)
                else:
                    os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # claim the name
                    try:
                        os.replace(tmp, final)
                    except OSError:
                        final.unlink(missing_ok=True)
                        raise
                break
            except FileExistsError:
                final = _bump(final)
            except OSError:
                if not use_link:
                    raise
                use_link = False  # no hard links here: claim-and-rename instead
    except OSError as e:
        raise UserError(f"cannot write {final}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _bump(path: Path) -> Path:
    head, _, tail = path.name.partition("-")
    if head.isdigit():
        return path.with_name(f"{int(head) + 1:0{len(head)}d}-{tail}")
    return path.with_name(f"{path.stem}-1{path.suffix}")


def check_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {outdir}: {e.strerror}; choose another --outdir") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise UserError(f"output folder {outdir} is not writable: choose another --outdir")


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr)
