"""Replay: the record that goes into each PNG (everything needed to make the image again), reading it back, and
the jobs that regenerate it bit for bit, callable from Python as from ``ldm txt2img --replay``
(`ldm_pipeline.generator.replay_image` makes the image again in one call)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.hashes import file_sha256, folder_hash, safetensors_autov3
from ldm_pipeline.metadata import FORMAT_VERSION, JSON_KEY
from ldm_pipeline.schedulers import SCHEDULERS
from ldm_pipeline.settings import Job, RuntimeOptions


def make_record(gen, job: Job, image) -> dict[str, Any]:
    """Everything needed to regenerate `image`, made by `gen` (an `ImageGenerator`) from `job`: the JSON chunk of
    its PNG."""
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
        "scheduler_config": _jsonable(dict(gen._scheduler(job.scheduler).config)),
        "eta": job.eta,
        "clip_skip": job.clip_skip,
        "width": image.width,
        "height": image.height,
        "model": {
            "name": gen.info.name,
            "source": gen.info.source,
            "hash": gen.info.hash,
            "path": gen.info.path,
            "config": gen.options.model_config,
        },
        "lora": gen.lora_records,
        "lora_scale": gen.options.lora_scale if gen.options.lora else None,
        "dtype": gen.options.dtype,
        "device_type": gen.device.split(":")[0],
        "versions": {
            "ldm_pipeline": ldm_pipeline.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    if gen.xl:  # SDXL's size conditioning, resolved as diffusers does: the image's own size, no crop
        size = (image.height, image.width)
        rec.update(original_size=list(job.original_size or size), target_size=list(job.target_size or size),
                   crop_top_left=list(job.crop_top_left or (0, 0)))
    if gen.options.fast:  # only then, so records of the normal path stay as they were
        rec["fast"] = True
    if job.init_image is not None:
        rec.update(
            strength=job.strength,
            init_image=str(Path(job.init_image).resolve()),
            init_image_sha256=file_sha256(job.init_image),
            resize_mode=job.resize_mode,
        )
    return rec


def batch_member(job: Job) -> dict[str, Any]:
    """What differs between the images of one batch (everything else is shared): enough to rebuild the batch."""
    m = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed}
    if job.init_image is not None:
        m.update(init_image=str(Path(job.init_image).resolve()), init_image_sha256=file_sha256(job.init_image))
    return m


def _path_hash(path: str) -> str:
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


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON record of an image we wrote; a one-line UserError for anything else."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            text = im.info.get(JSON_KEY) or getattr(im, "text", {}).get(JSON_KEY)
    except FileNotFoundError:
        raise UserError(f"replay image not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read replay image {path}: {e}") from None
    if not text:
        raise UserError(f"{path} has no ldm_pipeline metadata: only PNGs written by ldm txt2img/img2img can be replayed")
    try:
        record = json.loads(text)
    except ValueError:
        raise UserError(f"{path}: the ldm_pipeline metadata is not valid JSON") from None
    if record.get("format", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer ldm_pipeline (format {record['format']}): upgrade to replay it")
    return record


def jobs_from_record(record: dict) -> list:
    """The jobs that regenerate a recorded image: the image alone, or its whole batch when it was made in one
    (batched convolutions round differently from single ones). The recorded image is the job with index 0."""
    keys = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "guidance_rescale",
            "guidance_cutoff", "scheduler", "eta", "clip_skip", "strength", "init_image", "resize_mode")
    base = Job(**{k: record[k] for k in keys if k in record})
    for k in ("original_size", "target_size", "crop_top_left"):  # SDXL's, recorded as lists
        if record.get(k) is not None:
            setattr(base, k, tuple(record[k]))
    if base.guidance_cutoff is None:  # recorded before the option existed: every step was guided
        base.guidance_cutoff = 0.0
    base.height, base.width = record["height"], record["width"]
    batch = record.get("batch")
    if batch:
        members, position = batch["members"], batch["position"]
    else:
        members = [{k: record[k] for k in ("prompt", "negative_prompt", "seed", "init_image", "init_image_sha256")
                    if k in record}]
        position = 0
    jobs = []
    for pos, m in enumerate(members):
        job = dataclasses.replace(base, prompt=m["prompt"], negative_prompt=m["negative_prompt"], seed=m["seed"],
                                  index=0 if pos == position else pos + 1)
        if record.get("mode") == "img2img":
            job.init_image = m["init_image"]
            _check_init_image_unchanged(job.init_image, m.get("init_image_sha256"))
        jobs.append(job)
    return jobs


def _check_init_image_unchanged(path: str, sha256: str | None) -> None:
    if not Path(path).is_file():
        raise UserError(f"replay needs the init image {path}, which is not there")
    if file_sha256(path) != sha256:
        raise UserError(f"init image {path} has changed since the image was made; replay needs the original")


def replay_warnings(record: dict, gen) -> list[str]:
    """Replay is bit-exact on the recorded model, device type and dtype: what differs here, in words."""
    here = gen.device.split(":")[0]
    out = []
    if record["model"]["hash"] != gen.info.hash:
        out.append(f"model hash {gen.info.hash} differs from the recorded {record['model']['hash']}")
    if record.get("device_type") and record["device_type"] != here:
        out.append(f"the image was made on {record['device_type']} and is replayed on {here}: pixels may differ")
    if record.get("dtype") and record["dtype"] != gen.options.dtype:
        out.append(f"the image was made in {record['dtype']} and is replayed in {gen.options.dtype}: pixels may differ")
    if bool(record.get("fast")) != gen.options.fast:
        made, now = ("with", "without") if record.get("fast") else ("without", "with")
        out.append(f"the image was made {made} --fast and is replayed {now} it: pixels may differ")
    return out


def runtime_options(record: dict, **overrides) -> RuntimeOptions:
    """The recorded run's precision, single-file architecture and LoRAs, with `overrides` (device, memory switches)."""
    rec = {"dtype": record.get("dtype") or "fp32", "fast": bool(record.get("fast")),
           "model_config": record["model"].get("config"),
           "lora": [x["path"] for x in record.get("lora") or []]}
    if record.get("lora_scale") is not None:
        rec["lora_scale"] = record["lora_scale"]
    return RuntimeOptions(**{**rec, **{k: v for k, v in overrides.items() if v is not None}})


def recorded_model(record: dict) -> str:
    """Where the recorded model is: its absolute path, or its hub id."""
    return record["model"]["path"] or record["model"]["name"]
