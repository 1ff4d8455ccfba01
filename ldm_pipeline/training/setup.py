"""The parts of a run, built once before the loop: the accelerator, the models (`Run`) and the data stream (`Data`).

`setup_models` loads the model, freezes and casts what is not trained, adds LoRA adapters, builds the optimizer, LR
schedule and EMA, and hands the trained modules to accelerate. `setup_data` builds the batch stream (or the latent
cache) from a data position saved in a checkpoint, or from the start.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError
from ldm_pipeline.training.config import TrainConfig, is_lora, warmup_warning
from ldm_pipeline.training.parallel import (
    check_backend,
    fill_deepspeed_config,
    resolve_mixed_precision,
    trains_text_encoder,
)


def log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"ldm train: {msg}")


def make_accelerator(config: TrainConfig):
    """The Accelerator for `config`, after refusing what its distributed backend cannot do (see `parallel`)."""
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


def weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(config: TrainConfig, params: list, lr: float):
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


def make_lr_scheduler(config: TrainConfig, optimizer):
    if config.lr_scheduler == "warmup_stable_decay":  # not among diffusers' schedules; transformers has it
        from transformers.optimization import get_wsd_schedule

        return get_wsd_schedule(optimizer, num_warmup_steps=config.lr_warmup_steps,
                                num_decay_steps=config.lr_decay_steps, num_training_steps=config.max_steps)
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps, num_cycles=config.lr_num_cycles,
                         power=config.lr_power)


@dataclass
class Run:
    """The run's parts, built once by `setup_models`; the loop's functions take it instead of sharing closures."""

    config: TrainConfig
    accelerator: Any
    out: Path
    info: Any  # ldm_pipeline.models.ModelInfo of --model
    pipe: Any  # the loaded pipeline: its scheduler is saved with the model
    unet: Any  # as prepared by accelerate (DDP/FSDP-wrapped where distributed)
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler: the forward process the loss is computed on
    weight_dtype: Any  # of the frozen modules (the mixed-precision dtype)
    sampling: Any  # validation.SamplingSettings, the config's None filled from the model's defaults
    lr: float  # peak UNet learning rate (after scale_lr)
    optimizer: Any = None
    lr_scheduler: Any = None
    ema: Any = None  # diffusers EMAModel over `trained_params`, or None
    trained: tuple = ()  # the prepared modules that are trained (for accelerator.accumulate)
    trained_params: list = field(default_factory=list)  # clipped and averaged
    fp32_copies: dict[str, Any] = field(default_factory=dict)  # full-precision frozen modules, for saving
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer; else None
    tokenizer_2: Any = None
    vae_dtype: Any = None  # what the VAE encodes in: weight_dtype, or fp32 for SDXL's VAE under fp16 (see xl.py)

    @property
    def use_lora(self) -> bool:
        return is_lora(self.config)

    @property
    def train_te(self) -> bool:
        return trains_text_encoder(self.config)

    @property
    def xl(self) -> bool:
        """An SDXL-architecture model: two text encoders, pooled and size conditioning (`xl`)."""
        return self.text_encoder_2 is not None

    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by component name: text_encoder, and text_encoder_2 for SDXL."""
        found = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in found.items() if v is not None}


def setup_models(config: TrainConfig, accelerator) -> Run:
    """Load --model, put its modules in their training dtypes and modes, optimizer + LR + EMA, accelerate prepare."""
    from ldm_pipeline.models import load_pipeline
    from ldm_pipeline.training import validation

    with accelerator.main_process_first():  # one download/conversion, the others read the cache
        pipe, info = load_pipeline(config.model, seed=config.seed)
    # sample grids as `ldm txt2img` draws with this model (its example prompts, size, steps, sampler) where the config
    # leaves them None; train_config.yaml keeps the None (the saved model carries the defaults), so a rerun with the
    # same config compares equal to it (`ldm recipe` reuses a stage only then)
    sampling = validation.resolve_settings(config.validation, info.defaults)
    run = Run(config, accelerator, Path(config.output_dir), info, pipe, pipe.unet, pipe.vae, pipe.text_encoder,
              pipe.tokenizer, _noise_scheduler(config, pipe), weight_dtype(accelerator), sampling, 0.0,
              text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None))
    _place_modules(run)
    _make_optimization(run)
    _prepare(run)
    return run


def _noise_scheduler(config: TrainConfig, pipe):
    from diffusers import DDPMScheduler

    sched_config = dict(pipe.scheduler.config)
    if config.prediction_type != "model":
        sched_config["prediction_type"] = config.prediction_type
        pipe.scheduler = type(pipe.scheduler).from_config(sched_config)  # so saved models sample the same way
    noise_scheduler = DDPMScheduler.from_config(sched_config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type: the model's scheduler predicts '{noise_scheduler.config.prediction_type}', "
                        "which ldm train does not support; set prediction_type=epsilon or v_prediction")
    return noise_scheduler


def _place_modules(run: Run) -> None:
    """requires_grad, LoRA adapters, dtypes, devices, gradient checkpointing and train/eval modes."""
    import torch
    from diffusers.training_utils import cast_training_params

    from ldm_pipeline.training import lora as lora_mod
    from ldm_pipeline.training import xl

    config, device, dtype = run.config, run.accelerator.device, run.weight_dtype
    unet, vae, encoders = run.unet, run.vae, run.text_encoders()
    use_lora, train_te = run.use_lora, run.train_te
    full_te = config.train_text_encoder and not use_lora  # the whole text encoder(s), not adapters
    run.vae_dtype = xl.vae_encode_dtype(vae, dtype, run.xl)
    vae.requires_grad_(False)
    for te in encoders.values():
        te.requires_grad_(full_te)
    unet.requires_grad_(not use_lora)
    if use_lora:
        lora_mod.add_unet_lora(unet, config.lora)
        if config.lora.text_encoder:
            for te in encoders.values():
                lora_mod.add_text_encoder_lora(te, config.lora)
    if run.xl and train_te:
        xl.freeze_unused_text_encoder_layers(run.text_encoder)
    # Frozen weights run in the mixed-precision dtype; trained weights stay fp32, else the grad scaler fails with
    # "Attempting to unscale FP16 gradients" (https://github.com/huggingface/diffusers/issues/6442).
    if dtype != torch.float32 and not use_lora:  # keep full-precision copies to save unchanged parts exactly
        if run.vae_dtype != torch.float32:
            run.fp32_copies["vae"] = copy.deepcopy(vae)
        if not train_te:
            run.fp32_copies.update({name: copy.deepcopy(te) for name, te in encoders.items()})
    vae.to(device, dtype=run.vae_dtype)
    unet.to(device, dtype=dtype if use_lora else torch.float32)
    for te in encoders.values():
        te.to(device, dtype=torch.float32 if full_te else dtype)
    if use_lora:
        cast_training_params([unet, *encoders.values()] if config.lora.text_encoder else unet, dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            for te in encoders.values():
                _checkpoint_activations(te)
    vae.eval()
    for te in encoders.values():
        te.train(train_te)
    unet.train()


def _checkpoint_activations(text_encoder) -> None:
    """Gradient checkpointing of a transformers text encoder (`activation_checkpointing_enable` where transformers
    has it: `gradient_checkpointing_enable` is its deprecated alias)."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
    enable()


def _make_optimization(run: Run) -> None:
    """Optimizer (one param group per trained model), LR schedule and EMA."""
    from diffusers.training_utils import EMAModel

    config, accelerator = run.config, run.accelerator
    unet_params = [p for p in run.unet.parameters() if p.requires_grad]
    te_params = [p for te in run.text_encoders().values() for p in te.parameters() if p.requires_grad] \
        if run.train_te else []
    lr = config.learning_rate
    te_lr = config.text_encoder_learning_rate or lr
    if config.scale_lr:
        scale = config.batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        lr, te_lr = lr * scale, te_lr * scale
    if accelerator.is_main_process and (warning := warmup_warning(config, lr)):
        logging.getLogger("ldm_pipeline.training").warning(warning)
    groups = [{"params": unet_params, "lr": lr}] + ([{"params": te_params, "lr": te_lr}] if te_params else [])
    run.lr = lr
    run.optimizer = make_optimizer(config, groups, lr)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process per call unless the step counts
    # are scaled by the number of processes (https://github.com/huggingface/diffusers/issues/6137). We step it
    # ourselves once per optimizer step and checkpoint it as a registered object.
    run.lr_scheduler = make_lr_scheduler(config, run.optimizer)
    # EMA averages everything that is trained: the UNet and, when trained with it, the text encoder(s), so the
    # averaged UNet is saved beside the text encoders it was averaged with
    run.trained_params = unet_params + te_params
    if config.ema.enabled:
        e = config.ema
        run.ema = EMAModel(run.trained_params, decay=e.decay, min_decay=e.min_decay,
                           update_after_step=e.update_after_step, use_ema_warmup=e.use_warmup,
                           inv_gamma=e.inv_gamma, power=e.power)
        run.ema.to(accelerator.device)


def _prepare(run: Run) -> None:
    """accelerate prepare, and what save_state/load_state checkpoint besides the prepared objects."""
    accelerator = run.accelerator
    if run.train_te:
        names = list(run.text_encoders())
        prepared = accelerator.prepare(run.unet, *run.text_encoders().values(), run.optimizer)
        run.unet, run.optimizer = prepared[0], prepared[-1]
        for name, module in zip(names, prepared[1:-1]):
            setattr(run, name, module)
        run.trained = (run.unet, *run.text_encoders().values())
    else:
        run.unet, run.optimizer = accelerator.prepare(run.unet, run.optimizer)
        run.trained = (run.unet,)
    accelerator.register_for_checkpointing(run.lr_scheduler)
    if run.ema is not None:
        accelerator.register_for_checkpointing(run.ema)
    if run.use_lora:
        # checkpoint only the adapters, not the frozen base (4 GB for SD 1.5), as diffusers' LoRA script does
        def only_trainable(models, weights, _dir):
            for m, w in zip(models, weights):
                keep = {n for n, p in m.named_parameters() if p.requires_grad}
                for k in [k for k in w if k not in keep]:
                    del w[k]

        accelerator.register_save_state_pre_hook(only_trainable)


@dataclass
class Data:
    """This rank's batch stream and where it stands: a live data loader (`loader_state`), or the latent cache
    (`cached_position`, its {"epoch", "index"})."""

    batches: Iterator[dict[str, Any]]
    loader_state: Any = None  # ldm_pipeline.data.LoaderState, None for the latent cache
    cached_position: dict[str, Any] | None = None
    cache_stats: dict[str, Any] | None = None  # the cache's data summary (this rank's)
    cache_seconds: float = 0.0  # wall time of the caching pass

    def update(self, batch_state: dict[str, Any]) -> None:
        """Record the position after a batch (its "state")."""
        if self.loader_state is not None:
            self.loader_state.update(batch_state)
        else:
            self.cached_position = batch_state

    def position(self) -> dict[str, Any] | None:
        """The position to save: resuming from it continues with the next batch."""
        return self.loader_state.to_dict() if self.loader_state is not None else self.cached_position

    def epoch(self) -> int:
        """Epochs this rank's data stream has finished (every worker has handed out a batch of a later one)."""
        if self.loader_state is None:
            return int(self.cached_position["epoch"]) if self.cached_position else 0
        states = self.loader_state.workers.values()
        if not states or len(states) < (self.loader_state.num_workers or 1):
            return 0
        return min(int(s["epoch"]) for s in states)


def setup_data(run: Run, position: dict[str, Any] | None) -> Data:
    """The batch stream from `position` (a checkpoint's, None = the start); with cache_latents, after the caching
    pass (collective)."""
    from ldm_pipeline.data import LoaderState, build_dataset, make_dataloader

    config, accelerator = run.config, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    if not config.cache_latents:
        dataset = build_dataset(config.data, config.batch_size, tokenizer=run.tokenizer, rank=rank, world_size=world,
                                tokenizer_2=run.tokenizer_2)
        loader_state = LoaderState.from_dict(position) if position else LoaderState()
        batches = iter(make_dataloader(dataset, config.data.num_workers, loader_state if position else None))
        return Data(batches, loader_state=loader_state)
    from ldm_pipeline.training import caching

    t0 = time.perf_counter()
    cache_dir = Path(config.cache_dir) if config.cache_dir else run.out / "cache"
    te = accelerator.unwrap_model(run.text_encoder)
    te2 = accelerator.unwrap_model(run.text_encoder_2) if run.xl else None
    embeddings = not run.train_te
    model_hash = caching.encoders_hash(run.vae, te, run.tokenizer, embeddings, te2, run.tokenizer_2)
    manifest = caching.build_cache(cache_dir, config.data, config.cache_batch_size, run.vae, te, run.tokenizer,
                                   accelerator.device, run.vae_dtype, model_hash, embeddings, rank, world,
                                   progress=accelerator.is_main_process and config.progress_bar,
                                   text_encoder_2=te2, tokenizer_2=run.tokenizer_2)
    accelerator.wait_for_everyone()  # the only sync point of the caching pass
    dataset = caching.CachedLatentDataset(cache_dir, rank, world, config.batch_size, config.data)
    dataset.load_state_dict(position)
    data = Data(iter(dataset), cached_position=position, cache_stats=manifest.get("stats", {}),
                cache_seconds=time.perf_counter() - t0)
    from accelerate.utils import gather_object

    from ldm_pipeline.data.stats import merge_stat_dicts, summarize

    cached_all = merge_stat_dicts(gather_object([data.cache_stats or {}]))
    log(accelerator, f"cached {cached_all['used']} samples: {summarize(cached_all)}")
    return data
