"""What a run writes: checkpoints (with the `TrainState`), validation grids, and the final model with its card,
metrics.json and loss curve. Every folder and JSON file is published atomically (``ldm_pipeline.files``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ldm_pipeline.config import flatten, save_yaml, to_dict
from ldm_pipeline.training import checkpoints as ckpt
from ldm_pipeline.training.config import TrainConfig, is_lora
from ldm_pipeline.training.parallel import trains_text_encoder
from ldm_pipeline.training.setup import Data, Run, log
from ldm_pipeline.training.state import TrainState


def saving_pipeline(run: Run, full_unet=None):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) for saving: the trained modules (sharing their
    weights) and the full-precision copies of the frozen ones (mixed precision casts the live frozen ones)."""
    from ldm_pipeline.models import pipeline_from_components

    unwrap = run.accelerator.unwrap_model
    parts = {"unet": full_unet if full_unet is not None else unwrap(run.unet),
             "vae": run.fp32_copies.get("vae", run.vae), "tokenizer": run.tokenizer, "scheduler": run.pipe.scheduler}
    for name, te in run.text_encoders().items():
        parts[name] = run.fp32_copies.get(name, unwrap(te))
    if run.xl:
        parts["tokenizer_2"] = run.tokenizer_2
    pipe = pipeline_from_components(parts)
    if run.xl and "force_zeros_for_empty_prompt" in run.pipe.config:  # keep the model's own negative-prompt rule
        pipe.register_to_config(force_zeros_for_empty_prompt=run.pipe.config.force_zeros_for_empty_prompt)
    return pipe


def with_ema_weights(run: Run, fn, *args) -> None:
    """Run fn(*args) with the EMA weights swapped into the trained parameters."""
    run.ema.store(run.trained_params)
    run.ema.copy_to(run.trained_params)
    try:
        fn(*args)
    finally:
        run.ema.restore(run.trained_params)


def write_model(run: Run, folder: Path, use_ema: bool = False, full_unet=None) -> None:
    """The trained model into an existing (temporary) `folder`: LoRA weights, or a diffusers folder with the
    model's generation defaults."""
    from ldm_pipeline.models import write_defaults
    from ldm_pipeline.training import lora as lora_mod

    def write() -> None:
        if run.use_lora:
            unwrap = run.accelerator.unwrap_model
            encoders = [unwrap(te) for te in run.text_encoders().values()] if run.config.lora.text_encoder else []
            lora_mod.save_lora(folder, unwrap(run.unet), *encoders)  # SDXL: both text encoders' adapters
        else:
            saving_pipeline(run, full_unet).save_pretrained(folder, safe_serialization=True)
            write_defaults(folder, run.info.defaults)

    with_ema_weights(run, write) if use_ema else write()


def save_checkpoint(run: Run, state: TrainState, data: Data) -> Path:
    """Collective: ``checkpoint-STEP`` with accelerate's state, the config and the `TrainState` (and a loadable
    pipeline or the LoRA weights, raw and EMA)."""
    config = run.config
    state.data = data.position()

    def write_main(tmp: Path) -> None:
        save_yaml(config, tmp / ckpt.CONFIG_FILE)
        if run.use_lora or config.checkpoint_pipeline:
            name = "lora" if run.use_lora else "pipeline"
            for folder, use_ema in [(tmp / name, False)] + ([(tmp / f"{name}_ema", True)] if run.ema else []):
                folder.mkdir()
                write_model(run, folder, use_ema)
        extra = {"model": run.info.name, "model_hash": run.info.hash, "cache_latents": config.cache_latents}
        ckpt.write_json(tmp / ckpt.STATE_FILE, state.shared_dict(run.accelerator.num_processes, extra))  # last

    path = ckpt.save_checkpoint(run.out, state.global_step, write_main, config.checkpoints_total_limit,
                                accelerator=run.accelerator, rank_state=state.rank_dict())
    log(run.accelerator, f"saved {path}")
    return path


def validate(run: Run, step: int) -> None:
    """Main process: a sample grid of the validation prompts with the live modules (EMA weights when averaged)."""
    from ldm_pipeline.training import validation

    sampling = run.sampling
    if not run.accelerator.is_main_process or not sampling.prompts:
        return
    for m in run.trained:
        m.eval()
    if run.ema is not None:
        run.ema.store(run.trained_params)
        run.ema.copy_to(run.trained_params)
    try:
        # the live modules in their training dtypes, on the training device, under autocast (the fp32 copies
        # kept for saving stay on the CPU)
        unwrap = run.accelerator.unwrap_model
        parts = {"unet": unwrap(run.unet), "vae": run.vae, "tokenizer": run.tokenizer, "scheduler": run.pipe.scheduler,
                 **{name: unwrap(te) for name, te in run.text_encoders().items()}}
        if run.xl:
            parts["tokenizer_2"] = run.tokenizer_2
        live = validation.live_pipeline(parts, run.accelerator.device)
        with run.accelerator.autocast():
            images = validation.sample_images(live, run.info, sampling, sampling.height, sampling.width,
                                              str(run.accelerator.device))
    finally:
        if run.ema is not None:
            run.ema.restore(run.trained_params)
        for m in run.trained:
            m.train()
    path = validation.save_samples(images, sampling.prompts, run.out / "samples", step)
    from PIL import Image

    with Image.open(path) as grid:
        validation.log_grid(run.accelerator, grid.convert("RGB"), step)


def save_final(run: Run, state: TrainState, data_stats: dict[str, Any], full_unet=None) -> Path:
    """Main process: final/ (the EMA weights when averaged, the raw ones then in final_raw/) with its config and
    model card, metrics.json and loss_curve.png."""
    from ldm_pipeline.files import atomic_dir
    from ldm_pipeline.training import validation

    out, config = run.out, run.config
    metrics = {"loss": state.mean_recent_loss(), "global_step": state.global_step, "samples_seen": state.samples_seen,
               "bad_steps": state.bad_steps, "data": data_stats}
    if run.ema is not None:
        with atomic_dir(out / "final_raw", overwrite=True) as tmp:
            write_model(run, tmp)
    with atomic_dir(out / "final", overwrite=True) as tmp:
        write_model(run, tmp, use_ema=run.ema is not None, full_unet=full_unet if run.ema is None else None)
        save_yaml(config, tmp / ckpt.CONFIG_FILE)
        (tmp / "README.md").write_text(model_card(config, run.info, metrics, run.xl), encoding="utf-8")
    ckpt.write_json(out / "metrics.json", {**metrics, "losses": state.losses})
    if state.losses:
        validation.draw_loss_curve([s for s, _ in state.losses], [v for _, v in state.losses], out / "loss_curve.png")
    return out / "final"


def gathered_unet(accelerator, unet):
    """Collective: the UNet with whole weights, from FSDP's gathered full state dict (main process; None elsewhere)."""
    state = accelerator.get_state_dict(unet)
    if not accelerator.is_main_process:
        return None
    inner = accelerator.unwrap_model(unet)
    whole = type(inner).from_config(inner.config)
    whole.load_state_dict(state)
    return whole


def flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """Scalar config values for the trackers' hparams (tensorboard rejects lists and None)."""
    return {k: v for k, v in flatten(to_dict(config)).items() if isinstance(v, (int, float, str, bool))}


def model_card(config: TrainConfig, info, metrics: dict[str, Any], xl: bool = False) -> str:  # a template: long
    import yaml

    trained = ("UNet and both text encoders" if xl else "UNet and text encoder") if trains_text_encoder(config) \
        else "UNet"
    if is_lora(config):
        kind = f"LoRA adapters (rank {config.lora.rank}) on the {trained}"
    elif info.source == "config":
        kind = f"{trained} trained from scratch (random initialisation)"
    else:
        kind = f"full fine-tune of the {trained}"
    if config.ema.enabled:
        weights = (f"These are the EMA weights of the {trained}{' adapters' if is_lora(config) else ''} (decay up to "
                   f"{config.ema.decay}); the raw weights are in `final_raw/`.")
    else:
        weights = "These are the raw trained weights (no EMA)."
    loss = metrics["loss"]
    usage = (f"ldm txt2img --model {info.name} --lora {Path(config.output_dir) / 'final'} --lora-scale 1.0 \"a prompt\""
             if is_lora(config) else f"ldm txt2img --model {Path(config.output_dir) / 'final'} \"a prompt\"")
    return f"""---
library_name: diffusers
base_model: {info.name}
tags: [stable-diffusion{', stable-diffusion-xl' if xl else ''}, text-to-image, ldm_pipeline{', lora' if is_lora(config) else ''}]
---

# {Path(config.output_dir).name}

Base model `{info.name}` (hash {info.hash}): {kind}, trained with `ldm train`. {weights}

## Training data

- source: `{config.data.source}` (format {config.data.format})
- resolution {config.data.resolution}, center crop {config.data.center_crop}, random flip {config.data.random_flip},
  bucketing {config.data.bucketing}, caption dropout {config.data.caption_dropout}
- samples: {json.dumps(metrics['data'])}

## Results

| metric | value |
|---|---|
| optimizer steps | {metrics['global_step']} |
| samples seen | {metrics['samples_seen']} |
| final loss (mean of last 10 steps) | {f'{loss:.6f}' if loss is not None and math.isfinite(loss) else loss} |
| skipped NaN/inf steps | {metrics['bad_steps']} |

## Use

```
{usage}
```

## Configuration

```yaml
{yaml.safe_dump(to_dict(config), sort_keys=False).rstrip()}
```
"""
