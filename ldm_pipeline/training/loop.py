"""`train(config)`: fine-tune (or LoRA-train, or train from scratch) a latent diffusion model with accelerate.

The loop, in order: load the model → freeze/cast what is not trained → optimizer, LR schedule, EMA → accelerate
prepare → resume → (cache latents) → repeat until max_steps: gradient-accumulation window of micro-batches
(encode → noise → UNet → loss → backward) → skip on NaN/inf → clip → optimizer/LR/EMA step → log, validate,
checkpoint (the last step always) → final model + model card + loss curve.

Step counting is per optimizer step everywhere (max_steps, LR schedule, checkpoint and validation intervals), for any
number of processes and accumulation steps; the accumulation count is accelerate's (our config, unless
``accelerate launch`` or a DeepSpeed config sets it). What FSDP and DeepSpeed support is decided in `parallel`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.config import flatten, save_yaml, to_dict
from ldm_pipeline.errors import UserError
from ldm_pipeline.training import checkpoints as ckpt
from ldm_pipeline.training.config import TrainConfig, is_lora, resolve, warmup_warning
from ldm_pipeline.training.parallel import (
    check_backend,
    fill_deepspeed_config,
    resolve_mixed_precision,
    trains_text_encoder,
)


class TrainingDiverged(Exception):
    """Too many NaN/inf losses in a row; the message is one line for the user (CLI exit code 3)."""


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None  # diffusers folder (full fine-tuning) or LoRA weights folder
    global_step: int  # optimizer steps done
    samples_seen: int  # over all processes
    loss: float | None  # mean loss of the last (up to) 10 logged steps
    bad_steps: int  # optimizer steps skipped for a NaN/inf loss
    losses: list[tuple[int, float]] = field(default_factory=list)
    data_stats: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the optimizer steps (not loading, caching, checkpoints or validation)
    cache_seconds: float = 0.0  # wall time of the latent-caching pass


def _log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"ldm train: {msg}")


def _make_accelerator(config: TrainConfig):
    """The Accelerator for `config`, after refusing what its distributed backend cannot do (see `parallel`)."""
    import datetime

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    mp = resolve_mixed_precision(config.mixed_precision, os.environ, torch.cuda.is_available())
    log_with = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("report_to wandb needs the wandb package: pip install wandb") from None
    out = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=mp,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # the latent-caching pass ends in a barrier that waits for the slowest rank (see caching.py)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=7200))],
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    ds_config = plugin.deepspeed_config if plugin is not None else None
    check_backend(config, str(accelerator.distributed_type), ds_config)
    if ds_config is not None:
        fill_deepspeed_config(ds_config, config.batch_size)
    return accelerator


def _check_output_dir(accelerator, config: TrainConfig) -> Path | None:
    """All ranks check (so all raise together) before the main process touches anything; returns the checkpoint
    to resume from, if any."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{accelerator.process_index}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output dir {out}: {e.strerror or e}") from None
    resume = ckpt.resolve_resume(out, config.resume)
    entries = [p for p in out.iterdir() if not p.name.startswith(".write-test-")]
    if entries and config.resume is None and not config.overwrite:
        raise UserError(f"output dir {out} is not empty: pass --resume latest to continue that run, "
                        "--overwrite to start over (deletes its contents), or another --output-dir")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config.overwrite and config.resume is None:
            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        ckpt.remove_stale_tmp(out)
        if resume is not None:  # checkpoints after the one we resume from belong to an abandoned future
            moved = ckpt.set_aside_future(out, ckpt.checkpoint_step(resume))
            if moved:
                _log(accelerator, f"resuming from {resume.name}: set aside the later "
                                  f"{', '.join(p.name for p in moved)} (not resumed from, not pruned)")
    accelerator.wait_for_everyone()
    return resume


def _weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _make_optimizer(config: TrainConfig, params: list, lr: float):
    """AdamW (or bitsandbytes' 8-bit AdamW) over `params`: tensors or param groups with their own "lr"."""
    import torch

    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _make_lr_scheduler(config: TrainConfig, optimizer):
    if config.lr_scheduler == "warmup_stable_decay":  # not among diffusers' schedules; transformers has it
        from transformers.optimization import get_wsd_schedule

        return get_wsd_schedule(optimizer, num_warmup_steps=config.lr_warmup_steps,
                                num_decay_steps=config.lr_decay_steps, num_training_steps=config.max_steps)
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps, num_cycles=config.lr_num_cycles,
                         power=config.lr_power)


def train(config: TrainConfig) -> TrainResult:
    """Run one training job; raises UserError for bad input and TrainingDiverged after max_bad_steps NaN losses."""
    from ldm_pipeline.training.packages import check_packages, train_packages

    config = resolve(config)
    check_packages(train_packages(config), "training")  # before the output dir or a model is touched
    accelerator = _make_accelerator(config)
    result = _train(config, accelerator)
    # The process group goes only after every rank has dropped _train's DDP-wrapped models (on its return, and by
    # free_memory's gc): a 2-process gloo run hung, 2 times in about 15, while they were freed after end_training.
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _train(config: TrainConfig, accelerator) -> TrainResult:
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    from ldm_pipeline.data import LoaderState, build_dataset, make_dataloader
    from ldm_pipeline.models import load_pipeline, pipeline_from_components, save_pipeline
    from ldm_pipeline.training import lora as lora_mod
    from ldm_pipeline.training import losses, validation

    out = Path(config.output_dir)
    resume_from = _check_output_dir(accelerator, config)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    use_lora = is_lora(config)
    train_te = trains_text_encoder(config)
    fsdp = str(accelerator.distributed_type).endswith("FSDP")
    set_seed(config.seed)  # model init of configs/models YAMLs; resume restores the RNG states anyway
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # --- model -------------------------------------------------------------------------------------------------
    with accelerator.main_process_first():  # one download/conversion, the others read the cache
        pipe, info = load_pipeline(config.model, seed=config.seed)
    # sample grids as `ldm txt2img` draws with this model (its example prompts, size, steps, sampler) where the config
    # leaves them None; train_config.yaml keeps the None (the saved model carries the defaults), so a rerun with the
    # same config compares equal to it (`ldm recipe` reuses a stage only then)
    sampling = validation.resolve_settings(config.validation, info.defaults)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sched_config = dict(pipe.scheduler.config)
    if config.prediction_type != "model":
        sched_config["prediction_type"] = config.prediction_type
        pipe.scheduler = type(pipe.scheduler).from_config(sched_config)  # so saved models sample the same way
    noise_scheduler = DDPMScheduler.from_config(sched_config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type: the model's scheduler predicts '{noise_scheduler.config.prediction_type}', "
                        "which ldm train does not support; set prediction_type=epsilon or v_prediction")
    weight_dtype = _weight_dtype(accelerator)

    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.train_text_encoder and not use_lora)
    unet.requires_grad_(not use_lora)
    if use_lora:
        lora_mod.add_unet_lora(unet, config.lora)
        if config.lora.text_encoder:
            lora_mod.add_text_encoder_lora(text_encoder, config.lora)
    # Frozen weights run in the mixed-precision dtype; trained weights stay fp32, else the grad scaler fails with
    # "Attempting to unscale FP16 gradients" (https://github.com/huggingface/diffusers/issues/6442).
    fp32_copies = {}
    if weight_dtype != torch.float32 and not use_lora:  # keep full-precision copies to save unchanged parts exactly
        fp32_copies["vae"] = copy.deepcopy(vae)
        if not train_te:
            fp32_copies["text_encoder"] = copy.deepcopy(text_encoder)
    vae.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype if use_lora else torch.float32)
    text_encoder.to(device, dtype=torch.float32 if (train_te and not use_lora) else weight_dtype)
    if use_lora:
        cast_training_params([unet, text_encoder] if config.lora.text_encoder else unet, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    vae.eval()
    if not train_te:
        text_encoder.eval()
    unet.train()
    if train_te:
        text_encoder.train()

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_te else []
    lr = config.learning_rate
    te_lr = config.text_encoder_learning_rate or lr
    if config.scale_lr:
        scale = config.batch_size * accelerator.gradient_accumulation_steps * world
        lr, te_lr = lr * scale, te_lr * scale
    if accelerator.is_main_process and (warning := warmup_warning(config, lr)):
        logging.getLogger("ldm_pipeline.training").warning(warning)
    groups = [{"params": unet_params, "lr": lr}] + ([{"params": te_params, "lr": te_lr}] if te_params else [])
    optimizer = _make_optimizer(config, groups, lr)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process per call unless the step counts
    # are scaled by the number of processes (https://github.com/huggingface/diffusers/issues/6137). We step it
    # ourselves once per optimizer step and checkpoint it as a registered object.
    lr_scheduler = _make_lr_scheduler(config, optimizer)
    # EMA averages everything that is trained: the UNet and, when trained with it, the text encoder, so the averaged
    # UNet is saved beside the text encoder it was averaged with
    ema_params = unet_params + te_params
    ema = None
    if config.ema.enabled:
        e = config.ema
        ema = EMAModel(ema_params, decay=e.decay, min_decay=e.min_decay, update_after_step=e.update_after_step,
                       use_ema_warmup=e.use_warmup, inv_gamma=e.inv_gamma, power=e.power)
        ema.to(device)

    if train_te:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        trained = (unet, text_encoder)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        trained = (unet,)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if use_lora:
        # checkpoint only the adapters, not the frozen base (4 GB for SD 1.5), as diffusers' LoRA script does
        def _only_trainable(models, weights, _dir):
            for m, w in zip(models, weights):
                keep = {n for n, p in m.named_parameters() if p.requires_grad}
                for k in [k for k in w if k not in keep]:
                    del w[k]

        accelerator.register_save_state_pre_hook(_only_trainable)
    params_to_clip = unet_params + te_params
    # micro-batches per optimizer step: accelerate's count, which `accelerate launch --gradient_accumulation_steps`
    # or a DeepSpeed config may have set; the run is recorded with what it really does
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        _log(accelerator, f"gradient accumulation {accelerator.gradient_accumulation_steps} from accelerate's settings "
                          f"(instead of gradient_accumulation_steps={config.gradient_accumulation_steps})")
        config = dataclasses.replace(config, gradient_accumulation_steps=accelerator.gradient_accumulation_steps)

    # noise, timesteps and latent sampling draw from this generator (per rank), saved with every checkpoint
    noise_gen = torch.Generator(device=device).manual_seed((config.seed * 1_000_003 + rank) % (2**63))

    # --- resume ------------------------------------------------------------------------------------------------
    global_step, samples_seen, bad_steps, loss_history, data_state = 0, 0, 0, [], None
    resumed_step = None
    if resume_from is not None:
        _log(accelerator, f"resuming from {resume_from}")
        rank_state = ckpt.read_rank_state(resume_from, rank, world)
        accelerator.load_state(str(resume_from), strict=not use_lora)
        if ema is not None:
            ema.to(device)
        state = json.loads((resume_from / ckpt.STATE_FILE).read_text())
        global_step, samples_seen = int(state["global_step"]), int(state["samples_seen"])
        resumed_step = global_step
        bad_steps, loss_history = int(state["bad_steps"]), [tuple(x) for x in state["losses"]]
        noise_gen.set_state(ckpt.decode_bytes(rank_state["noise_generator"]))
        data_state = rank_state["data"]
    elif config.resume == "latest":
        _log(accelerator, f"no checkpoint in {out} yet: starting a new run")

    # --- data --------------------------------------------------------------------------------------------------
    cache_embeddings = config.cache_latents and not train_te
    cache_t0 = time.perf_counter()
    if config.cache_latents:
        from ldm_pipeline.training import caching

        cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
        te_for_cache = accelerator.unwrap_model(text_encoder)
        manifest = caching.build_cache(cache_dir, config.data, config.cache_batch_size, vae, te_for_cache, tokenizer,
                                       device, weight_dtype,
                                       caching.encoders_hash(vae, te_for_cache, tokenizer, cache_embeddings),
                                       cache_embeddings, rank, world,
                                       progress=accelerator.is_main_process and config.progress_bar)
        accelerator.wait_for_everyone()  # the only sync point of the caching pass
        dataset = caching.CachedLatentDataset(cache_dir, rank, world, config.batch_size, config.data)
        dataset.load_state_dict(data_state)
        batches = iter(dataset)
        loader_state = None
        cache_stats = manifest.get("stats", {})
        from accelerate.utils import gather_object

        cached_all = _merge_stats(gather_object([cache_stats or {}]))
        _log(accelerator, f"cached {cached_all['used']} samples: {_summary(cached_all)}")
    else:
        dataset = build_dataset(config.data, config.batch_size, tokenizer=tokenizer, rank=rank, world_size=world)
        loader_state = LoaderState.from_dict(data_state) if data_state else LoaderState()
        batches = iter(make_dataloader(dataset, config.data.num_workers, loader_state if data_state else None))
        cache_stats = None
    cached_state: dict[str, Any] | None = data_state
    cache_seconds = time.perf_counter() - cache_t0 if config.cache_latents else 0.0

    # --- bookkeeping -------------------------------------------------------------------------------------------
    if accelerator.is_main_process:
        save_yaml(config, out / ckpt.CONFIG_FILE)
        accelerator.init_trackers("ldm_train", config=_flat_hparams(config))
    keys_file = None
    if config.log_sample_keys:
        (out / "debug").mkdir(parents=True, exist_ok=True)
        keys_file = open(out / "debug" / f"sample_keys.rank{rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    saved_checkpoints: list[str] = []
    grad_norm = None

    def encode_latents(batch) -> torch.Tensor:
        if "latent_mean" in batch:  # cached posterior: sample it as the VAE would (see caching.py)
            mean = batch["latent_mean"].to(device, torch.float32)
            std = batch["latent_std"].to(device, torch.float32)
            eps = torch.randn(mean.shape, generator=noise_gen, device=noise_gen.device).to(device)
            latents = mean + std * eps
        else:
            with torch.no_grad():
                px = batch["pixel_values"].to(device, weight_dtype)
                latents = vae.encode(px).latent_dist.sample(generator=noise_gen).float()
        return (latents - shift) * scaling

    def encode_text(batch) -> torch.Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(device, weight_dtype)
        ids = batch["input_ids"].to(device)
        if train_te:
            return text_encoder(ids, return_dict=False)[0]
        with torch.no_grad():
            return text_encoder(ids, return_dict=False)[0]

    def compute_loss(batch) -> torch.Tensor:
        latents = encode_latents(batch)
        noise = losses.sample_noise(latents, noise_gen, config.noise_offset)
        timesteps = losses.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, noise_gen,
                                            device, config.timestep_sampling, config.timestep_logit_mean,
                                            config.timestep_logit_std)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = losses.target_for(noise_scheduler, latents, noise, timesteps)
        pred = unet(noisy, timesteps, encode_text(batch), return_dict=False)[0]
        weights = losses.min_snr_weights(noise_scheduler, timesteps, config.snr_gamma) if config.snr_gamma else None
        return losses.diffusion_loss(pred, target, weights)

    def rank_state_now() -> dict[str, Any]:
        data = loader_state.to_dict() if loader_state is not None else cached_state
        return {"data": data, "noise_generator": ckpt.encode_bytes(noise_gen.get_state())}

    def saving_pipeline(full_unet=None):
        """A StableDiffusionPipeline for saving: the trained modules (sharing their weights) and the full-precision
        copies of the frozen ones (mixed precision casts the live frozen ones)."""
        parts = {
            "unet": full_unet if full_unet is not None else accelerator.unwrap_model(unet),
            "vae": fp32_copies.get("vae", vae),
            "text_encoder": fp32_copies.get("text_encoder", accelerator.unwrap_model(text_encoder)),
            "tokenizer": tokenizer,
            "scheduler": pipe.scheduler,
        }
        return pipeline_from_components(parts)

    def with_ema_weights(fn, *args) -> None:
        """Run fn(*args) with the EMA weights swapped into the trained parameters."""
        ema.store(ema_params)
        ema.copy_to(ema_params)
        try:
            fn(*args)
        finally:
            ema.restore(ema_params)

    def save_ema_pipeline(path: Path) -> None:
        with_ema_weights(lambda: save_pipeline(saving_pipeline(), path, defaults=info.defaults, overwrite=True))

    def save_lora_weights(path: Path) -> None:
        lora_mod.save_lora(path, accelerator.unwrap_model(unet),
                           accelerator.unwrap_model(text_encoder) if config.lora.text_encoder else None)

    def write_checkpoint_extras(tmp: Path) -> None:
        save_yaml(config, tmp / ckpt.CONFIG_FILE)
        if use_lora:
            save_lora_weights(tmp / "lora")
            if ema is not None:
                with_ema_weights(save_lora_weights, tmp / "lora_ema")
        elif config.checkpoint_pipeline:
            save_pipeline(saving_pipeline(), tmp / "pipeline", defaults=info.defaults)
            if ema is not None:
                save_ema_pipeline(tmp / "pipeline_ema")
        ckpt.write_json(tmp / ckpt.STATE_FILE, {
            "global_step": global_step, "samples_seen": samples_seen, "bad_steps": bad_steps,
            "world_size": world, "losses": loss_history, "model": info.name, "model_hash": info.hash,
        })

    def save(step: int) -> None:
        nonlocal last_saved_step
        path = ckpt.save_checkpoint(accelerator, out, step, rank_state_now(), write_checkpoint_extras,
                                    config.checkpoints_total_limit)
        saved_checkpoints.append(str(path))
        last_saved_step = step
        _log(accelerator, f"saved {path}")

    def validate(step: int) -> None:
        if not accelerator.is_main_process or not sampling.prompts:
            return
        modules = [m for m in trained]
        for m in modules:
            m.eval()
        if ema is not None:
            ema.store(ema_params)
            ema.copy_to(ema_params)
        try:
            # the live modules in their training dtypes, on the training device, under autocast (the fp32 copies
            # kept for saving stay on the CPU)
            live = validation.live_pipeline({
                "unet": accelerator.unwrap_model(unet), "vae": vae,
                "text_encoder": accelerator.unwrap_model(text_encoder), "tokenizer": tokenizer,
                "scheduler": pipe.scheduler}, device)
            with accelerator.autocast():
                images = validation.sample_images(live, info, sampling, sampling.height, sampling.width, str(device))
        finally:
            if ema is not None:
                ema.restore(ema_params)
            for m in modules:
                m.train()
        path = validation.save_samples(images, sampling.prompts, out / "samples", step)
        from PIL import Image

        with Image.open(path) as grid:
            validation.log_grid(accelerator, grid.convert("RGB"), step)

    def data_epoch() -> int:
        """Epochs this rank's data stream has finished (every worker has handed out a batch of a later one)."""
        if loader_state is None:
            return int(cached_state["epoch"]) if cached_state else 0
        states = loader_state.workers.values()
        if not states or len(states) < (loader_state.num_workers or 1):
            return 0
        return min(int(s["epoch"]) for s in states)

    def report_data(epochs_done: int) -> None:
        """Collective: the data summary of all ranks' finished epochs, on the console and to the trackers."""
        from accelerate.utils import gather_object

        merged = _merge_stats(gather_object([loader_state.finished_epochs_stats().to_dict()]))
        _log(accelerator, f"data after epoch {epochs_done}: {_summary(merged)}")
        accelerator.log({"data/seen": merged["seen"], "data/used": merged["used"],
                         "data/skipped": sum(merged["skipped"].values()), "data/epochs": epochs_done},
                        step=global_step)

    # --- the loop ----------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    accum = config.gradient_accumulation_steps
    per_step = config.batch_size * accum * world
    _log(accelerator, f"{config.max_steps} steps of {per_step} samples ({world} process(es) x batch "
                      f"{config.batch_size} x {accum} accumulation), lr {lr:g} ({config.lr_scheduler}"
                      f"{f', warm-up {config.lr_warmup_steps}' if config.lr_warmup_steps else ''}), "
                      f"{'LoRA rank ' + str(config.lora.rank) if use_lora else 'full fine-tuning'}"
                      f"{' + text encoder' if train_te else ''}, mixed precision {accelerator.mixed_precision}")
    if config.validate_every and sampling.prompts:
        origin = ("config" if config.validation.prompts is not None else
                  "model's examples" if info.defaults.example_prompts else "generic")
        _log(accelerator, f"samples every {config.validate_every} steps: {len(sampling.prompts)} prompts ({origin}), "
                          f"{sampling.width}x{sampling.height}, {sampling.num_inference_steps} steps "
                          f"{sampling.scheduler}, CFG {sampling.guidance_scale:g}")
    bar = tqdm(total=config.max_steps, initial=global_step, desc="training", unit="step",
               disable=not (accelerator.is_main_process and config.progress_bar), dynamic_ncols=True)
    consecutive_bad, nan_injected = 0, 0
    train_seconds = 0.0
    last_saved_step = None
    epochs_reported = data_epoch()
    try:
        while global_step < config.max_steps:
            step_t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            n_samples = 0
            poison = (config.debug_nan_at_step is not None and global_step + 1 == config.debug_nan_at_step
                      and nan_injected < config.debug_nan_count)
            for _ in range(accum):
                batch = next(batches)
                # the accumulate context skips DDP's gradient all-reduce on all but the window's last micro-batch
                with accelerator.accumulate(*trained):
                    loss = compute_loss(batch)
                    if poison:
                        loss = loss * float("nan")
                    accelerator.backward(loss)
                loss_sum += loss.detach().float()
                n_samples += len(batch["keys"])
                if loader_state is not None:
                    loader_state.update(batch["state"])
                else:
                    cached_state = batch["state"]
                if keys_file is not None:
                    keys_file.write(json.dumps({"step": global_step + 1, "keys": list(batch["keys"])}) + "\n")
            if poison:
                nan_injected += 1
            # one collective per optimizer step: summed loss, samples, whether any rank saw a non-finite loss (every
            # rank must take the same decision, or DDP ranks would diverge) and the data epochs all ranks finished
            bad_local = 0.0 if torch.isfinite(loss_sum) else 1.0
            mine = torch.tensor([[loss_sum.nan_to_num(0.0).item(), float(n_samples), bad_local, float(data_epoch())]],
                                device=device)
            rows = accelerator.gather(mine).reshape(-1, 4) if world > 1 else mine
            totals, epochs_done = rows[:, :3].sum(0), int(rows[:, 3].min().item())
            if loader_state is not None and epochs_done > epochs_reported:
                report_data(epochs_done)
                epochs_reported = epochs_done
            if totals[2].item() > 0:
                # skip: no optimizer/LR/EMA step; zeroing the NaN gradients before the grad scaler unscales them
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                consecutive_bad += 1
                _log(accelerator, f"step {global_step + 1}: non-finite loss, step skipped "
                                  f"({consecutive_bad} in a row, {bad_steps} in total)")
                if consecutive_bad >= config.max_bad_steps:
                    last = ckpt.latest_checkpoint(out)
                    raise TrainingDiverged(
                        f"loss was NaN/inf for {consecutive_bad} optimizer steps in a row at step {global_step + 1}; "
                        f"stopped (last good checkpoint: {last or 'none'}). Lower the learning rate or check the data.")
                continue
            consecutive_bad = 0
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params_to_clip, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(ema_params)
            global_step += 1
            samples_seen += int(totals[1].item())
            train_seconds += time.perf_counter() - step_t0
            step_loss = totals[0].item() / (accum * world)
            loss_history.append((global_step, step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            if global_step % config.log_every == 0:
                logs = {"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0],
                        "train/samples_seen": samples_seen, "train/bad_steps": bad_steps}
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=global_step)
            if config.validate_every and global_step % config.validate_every == 0:
                validate(global_step)
            if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                save(global_step)
            if config.debug_sleep:
                time.sleep(config.debug_sleep)
        if global_step > 0 and global_step not in (last_saved_step, resumed_step):
            save(global_step)  # the last step always (checkpoint_every=0 too), so a later run can extend this one
    finally:
        bar.close()
        if keys_file is not None:
            keys_file.close()

    # --- outputs -----------------------------------------------------------------------------------------------
    from accelerate.utils import gather_object

    if config.log_sample_keys:  # debug: lets tests check that every rank ends with the same weights
        digests = {"trained": _digest(params_to_clip)}
        if ema is not None:
            digests["ema"] = _digest(ema.shadow_params)
        ckpt.write_json(out / "debug" / f"weights.rank{rank}.json", digests)
    if loader_state is not None:
        stats_all = gather_object([loader_state.stats().to_dict()])
    else:
        stats_all = gather_object([cache_stats or {}])
    # under FSDP every rank holds a shard: gather the whole UNet (a collective) before the main process saves it
    full_unet = _gathered_unet(accelerator, unet) if fsdp and not use_lora else None
    accelerator.wait_for_everyone()
    final_dir = out / "final"
    recent = [v for _, v in loss_history[-10:]]
    final_loss = sum(recent) / len(recent) if recent else None
    data_stats = _merge_stats(stats_all)
    if accelerator.is_main_process:
        # with EMA the final model is the EMA one (what EMA is for) and the raw weights go to final_raw/
        if use_lora:
            outputs = [(final_dir, ema is not None)] + ([(out / "final_raw", False)] if ema is not None else [])
            for folder, use_ema in outputs:
                tmp = out / f".{folder.name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                if use_ema:
                    with_ema_weights(save_lora_weights, tmp)
                else:
                    save_lora_weights(tmp)
                _finish_dir(tmp, folder)
        else:
            if ema is not None:
                save_pipeline(saving_pipeline(), out / "final_raw", defaults=info.defaults, overwrite=True)
                save_ema_pipeline(final_dir)
            else:
                save_pipeline(saving_pipeline(full_unet), final_dir, defaults=info.defaults, overwrite=True)
        save_yaml(config, final_dir / ckpt.CONFIG_FILE)
        metrics = {"loss": final_loss, "global_step": global_step, "samples_seen": samples_seen,
                   "bad_steps": bad_steps, "data": data_stats}
        (final_dir / "README.md").write_text(_model_card(config, info, metrics), encoding="utf-8")
        ckpt.write_json(out / "metrics.json", {**metrics, "losses": loss_history})
        if loss_history:
            validation.draw_loss_curve([s for s, _ in loss_history], [v for _, v in loss_history],
                                       out / "loss_curve.png")
        _log(accelerator, f"data: {_summary(data_stats)}")
        _log(accelerator, f"done: {global_step} steps, {samples_seen} samples, loss {final_loss}; model in {final_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(str(out), str(final_dir), global_step, samples_seen, final_loss, bad_steps,
                       list(loss_history), data_stats, saved_checkpoints, train_seconds, cache_seconds)


def _finish_dir(tmp: Path, final: Path) -> None:
    ckpt.fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _gathered_unet(accelerator, unet):
    """Collective: the UNet with whole weights, from FSDP's gathered full state dict (main process; None elsewhere)."""
    state = accelerator.get_state_dict(unet)
    if not accelerator.is_main_process:
        return None
    inner = accelerator.unwrap_model(unet)
    whole = type(inner).from_config(inner.config)
    whole.load_state_dict(state)
    return whole


def _summary(stats: dict[str, Any]) -> str:
    from ldm_pipeline.data.stats import DataStats

    return DataStats.from_dict(stats).summary()


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _merge_stats(items: list[dict]) -> dict[str, Any]:
    from ldm_pipeline.data.stats import DataStats

    total = DataStats()
    for d in items:
        if d:
            total = total.merge(DataStats.from_dict(d))
    return total.to_dict()


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """Scalar config values for the trackers' hparams (tensorboard rejects lists and None)."""
    return {k: v for k, v in flatten(to_dict(config)).items() if isinstance(v, (int, float, str, bool))}


def _model_card(config: TrainConfig, info, metrics: dict[str, Any]) -> str:
    import yaml

    trained = "UNet and text encoder" if trains_text_encoder(config) else "UNet"
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
tags: [stable-diffusion, text-to-image, ldm_pipeline{', lora' if is_lora(config) else ''}]
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
