"""`TrainConfig`: every knob of `ldm train`, with defaults for fine-tuning SD 1.5 on one GPU.

Precedence: these defaults < ``configs/train/*.yaml`` < command-line flags < trailing ``key=value`` overrides
(dotted for nested fields: ``data.random_flip=true``, ``lora.rank=8``). Unknown keys and wrong types are errors.
Fields left ``None`` are resolved by `resolve` from the rest of the config (e.g. the learning rate from LoRA or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ldm_pipeline.config import load_config, resolve_config_path
from ldm_pipeline.data.config import DataConfig
from ldm_pipeline.errors import UserError

# diffusers' get_scheduler names, plus warmup_stable_decay (transformers' get_wsd_schedule, Hägele et al. 2024)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "warmup_stable_decay")


@dataclass
class LoraSettings:
    """LoRA adapters (peft) instead of full fine-tuning; rank 0 = off."""

    rank: int = 0  # adapter rank r; 0 trains the full UNet instead
    alpha: float | None = None  # scale numerator (lora_alpha); None = rank, i.e. scale 1 (diffusers' default)
    dropout: float = 0.0  # dropout on the adapter input
    unet_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    text_encoder: bool = False  # also put adapters on the text encoder (what --train-text-encoder means with LoRA)
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class EMASettings:
    """Exponential moving average of the trained UNet weights (diffusers.training_utils.EMAModel)."""

    enabled: bool | None = None  # None = on for full fine-tuning, off for LoRA
    decay: float = 0.9999  # upper bound of the decay; the warm-up below ramps up to it
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = True  # @crowsonkb's warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    inv_gamma: float = 1.0
    power: float = 0.75  # 3/4 suits runs under ~200k steps (see EMAModel's docstring)


# validation prompts for a model that names none of its own (GenerationDefaults.example_prompts)
GENERIC_VALIDATION_PROMPTS = ["a photograph of an astronaut riding a horse",
                              "a watercolor painting of a fox in a snowy forest"]


@dataclass
class ValidationSettings:
    """Sample grids during training, through the same Generator as `ldm txt2img`. Each field left None takes the
    model's own default (its ldm_defaults.json / configs/models `defaults:`), so the grid shows what
    `ldm txt2img --model OUTPUT_DIR/final` will draw; the run logs the values used."""

    # None = the model's example prompts, else GENERIC_VALIDATION_PROMPTS; [] = no sample grids
    prompts: list[str] | None = None
    seed: int = 0  # image i of the grid uses seed + i, the same at every validation
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None


@dataclass
class TrainConfig:
    """One training run. Per-process batch size times processes times accumulation = samples per optimizer step."""

    # what `ldm txt2img --model` accepts: folder, checkpoint, .safetensors, hub id, shipped name, config:NAME (random)
    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)  # images + captions (ldm_pipeline.data)
    output_dir: str = ""  # checkpoints, samples, logs and the final model go here
    # --- what to train
    train_text_encoder: bool = False  # fine-tune the text encoder jointly (needed when training from scratch)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # --- schedule
    max_steps: int = 10_000  # optimizer steps (not micro-batches, not per-process steps)
    batch_size: int = 1  # micro-batch per process
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step
    learning_rate: float | None = None  # None = 1e-5 full fine-tuning, 1e-4 LoRA
    # the text encoder's own rate (kohya's --text_encoder_lr); None = learning_rate. Trained jointly from scratch,
    # a text encoder at the UNet's rate learns to ignore the words the young UNet cannot use yet (shapes model)
    text_encoder_learning_rate: float | None = None
    scale_lr: bool = False  # multiply the learning rate by batch_size * accumulation * processes
    lr_scheduler: str = "constant_with_warmup"  # one of LR_SCHEDULERS (diffusers.optimization.get_scheduler)
    # optimizer steps of linear warm-up from 0 (not for constant); None = 10 % of max_steps, at most 500 (a resumed
    # run keeps its own). One not shorter than the run never reaches the peak rate: honoured with a warning when
    # given (an error for warmup_stable_decay, whose decay would never start)
    lr_warmup_steps: int | None = None
    lr_num_cycles: int = 1  # cosine_with_restarts
    lr_power: float = 1.0  # polynomial
    # warmup_stable_decay: the constant rate's last lr_decay_steps steps fall to 0 along a half cosine, so a run
    # trains at full rate for longest and still ends on annealed weights (what an EMA gives, without its lag)
    lr_decay_steps: int = 0
    # --- optimizer
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit needs bitsandbytes (CUDA)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    # --- precision and memory
    # auto = $ACCELERATE_MIXED_PRECISION (accelerate launch --mixed_precision, accelerate config) when set, else
    # fp16 on CUDA and no on CPU
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~20% slower
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    # deterministic GPU kernels (torch.use_deterministic_algorithms, by accelerate's set_seed): a run, and a resumed
    # run, repeat bit for bit on the same GPU (flash attention's and cuDNN's backward are not so by default); slower
    deterministic: bool = False
    # --- objective
    prediction_type: Literal["model", "epsilon", "v_prediction"] = "model"  # model = the scheduler's own
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is the paper's choice
    noise_offset: float = 0.0  # offset noise (Guttenberg 2023): helps very dark/bright images; ~0.05-0.1
    # which training timesteps to draw: uniform (DDPM), or logit-normal (SD3, Esser et al. 2024): t/T ~ sigmoid(N(
    # timestep_logit_mean, timestep_logit_std²)), more steps at the middle noise levels where layout and shape are
    # decided; a positive mean moves them towards more noise
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    ema: EMASettings = field(default_factory=EMASettings)
    seed: int = 0  # seeds model init (config models), noise, timesteps; data shuffling is data.seed
    # --- latent caching
    cache_latents: bool = False  # encode images (and captions, if the text encoder is frozen) once, then train on them
    cache_dir: str | None = None  # None = OUTPUT_DIR/cache
    cache_batch_size: int = 8  # images per VAE call in the precompute pass
    # --- checkpoints, validation, logging
    checkpoint_every: int = 500  # optimizer steps between checkpoints; the last step always gets one (0 = only it)
    checkpoints_total_limit: int | None = 3  # keep the newest N checkpoint-STEP dirs of this run; None = all
    checkpoint_pipeline: bool = True  # write checkpoint-STEP/pipeline/ (loadable by ldm txt2img) with each checkpoint
    validate_every: int = 500  # optimizer steps between sample grids; 0 = off
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    log_every: int = 1  # optimizer steps between tracker logs
    progress_bar: bool = True  # tqdm on the main process
    # --- robustness
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops (exit 3)
    # "latest" or a checkpoint-STEP path; later checkpoints in output_dir are renamed checkpoint-N.abandoned-TIME
    resume: str | None = None
    overwrite: bool = False  # allow a non-empty output_dir without resume (its contents are deleted)
    # resume even from a checkpoint of another model, another cache_latents, or a changed training config (fields
    # other than max_steps, checkpoint/validation/logging intervals and output paths); refused by default
    allow_resume_changes: bool = False


def load_train_config(path: str | Path | None = None, *layers: dict) -> TrainConfig:
    """Defaults < YAML (a path or a name under configs/train) < each layer (flags, then key=value overrides)."""
    if path is not None:
        path = resolve_config_path(path, "train")
    return load_config(TrainConfig, path, *layers)


def is_lora(config: TrainConfig) -> bool:
    return config.lora.rank > 0


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the `None` defaults that depend on other fields and check the combination; returns a new config."""
    import dataclasses

    c = dataclasses.replace(config, lora=dataclasses.replace(config.lora), ema=dataclasses.replace(config.ema),
                            validation=dataclasses.replace(config.validation), data=dataclasses.replace(config.data))
    if not c.model:
        raise UserError("no model given: pass --model (a diffusers folder, checkpoint, .safetensors, hub id, or "
                        "config:NAME for random weights from configs/models)")
    if not c.data.source:
        raise UserError("no training data given: pass --data (webdataset tars, parquet, an image folder or a HF dataset)")
    if not c.output_dir:
        raise UserError("no output directory given: pass --output-dir")
    if c.lora.rank < 0:
        raise UserError(f"lora.rank must be >= 0 (got {c.lora.rank})")
    if c.lora.text_encoder and c.lora.rank == 0:
        raise UserError("lora.text_encoder=true needs lora.rank > 0 (to train the whole text encoder instead, "
                        "use train_text_encoder=true)")
    lora = is_lora(c)
    if c.learning_rate is None:
        c.learning_rate = 1e-4 if lora else 1e-5
    if c.ema.enabled is None:
        c.ema.enabled = not lora
    if c.lr_warmup_steps is None:
        resumed = _resumed_warmup_steps(c)
        c.lr_warmup_steps = (resumed if resumed is not None else
                             0 if c.lr_scheduler == "constant" else default_warmup_steps(c.max_steps))
    if lora and c.train_text_encoder:
        c.lora.text_encoder = True  # --train-text-encoder with LoRA means adapters on the text encoder
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_bad_steps", "cache_batch_size",
                 "log_every"):
        if getattr(c, name) < 1:
            raise UserError(f"{name} must be at least 1 (got {getattr(c, name)})")
    for name in ("checkpoint_every", "validate_every", "lr_warmup_steps", "lr_decay_steps"):
        if getattr(c, name) < 0:
            raise UserError(f"{name} must be >= 0 (got {getattr(c, name)})")
    if c.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"lr_scheduler '{c.lr_scheduler}' is not one of {', '.join(LR_SCHEDULERS)}")
    if c.learning_rate <= 0:
        raise UserError(f"learning_rate must be positive (got {c.learning_rate})")
    if c.text_encoder_learning_rate is not None and c.text_encoder_learning_rate <= 0:
        raise UserError(f"text_encoder_learning_rate must be positive (got {c.text_encoder_learning_rate})")
    if c.snr_gamma is not None and c.snr_gamma <= 0:
        raise UserError(f"snr_gamma must be positive (got {c.snr_gamma})")
    if c.checkpoints_total_limit is not None and c.checkpoints_total_limit < 1:
        raise UserError("checkpoints_total_limit must be at least 1 (or null for no limit)")
    _check_ranges(c)
    if c.cache_latents:
        # the cache holds one encoding per image (and its mirror image), so per-epoch random choices must be
        # reproducible from it: random crops and tag shuffling are not (see caching.py)
        if not c.data.center_crop:
            raise UserError("cache_latents needs data.center_crop=true (a random crop cannot be cached)")
        if c.data.bucketing:
            raise UserError("cache_latents does not support data.bucketing yet: turn one of them off")
        if c.data.shuffle_tags:
            raise UserError("cache_latents does not support data.shuffle_tags (captions are tokenized once): "
                            "turn one of them off")
    if c.resume is not None and c.resume != "latest" and not Path(c.resume).exists():
        raise UserError(f"--resume {c.resume}: no such checkpoint (pass 'latest' or a checkpoint-STEP folder)")
    return c


def _check_ranges(c: TrainConfig) -> None:
    """Values no run can use, each reported with its dotted key (before any model is loaded)."""
    d = c.data

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise UserError(f"{key} must be {what} (got {value})")

    need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    need(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution", "a positive multiple of 8", d.resolution)
    need(d.bucket_step >= 8 and d.bucket_step % 8 == 0, "data.bucket_step", "a positive multiple of 8", d.bucket_step)
    need(0.0 <= d.caption_dropout <= 1.0, "data.caption_dropout", "in [0, 1]", d.caption_dropout)
    need(d.keep_tags >= 0, "data.keep_tags", ">= 0", d.keep_tags)
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", d.shuffle_buffer)
    need(d.max_image_pixels > 0, "data.max_image_pixels", "positive", d.max_image_pixels)
    need(d.min_size is None or d.min_size >= 1, "data.min_size", "at least 1 (or null)", d.min_size)
    if c.lora.rank > 0:
        need(c.lora.alpha is None or c.lora.alpha > 0, "lora.alpha", "positive (or null for the rank)", c.lora.alpha)
        need(0.0 <= c.lora.dropout < 1.0, "lora.dropout", "in [0, 1)", c.lora.dropout)
        need(bool(c.lora.unet_target_modules), "lora.unet_target_modules", "a non-empty list",
             c.lora.unet_target_modules)
        if c.lora.text_encoder:
            need(bool(c.lora.text_encoder_target_modules), "lora.text_encoder_target_modules", "a non-empty list",
                 c.lora.text_encoder_target_modules)
    e = c.ema
    if e.enabled:
        need(0.0 < e.decay <= 1.0, "ema.decay", "in (0, 1]", e.decay)
        need(0.0 <= e.min_decay <= e.decay, "ema.min_decay", f"in [0, ema.decay={e.decay}]", e.min_decay)
        need(e.update_after_step >= 0, "ema.update_after_step", ">= 0", e.update_after_step)
        need(e.inv_gamma > 0, "ema.inv_gamma", "positive", e.inv_gamma)
        need(e.power > 0, "ema.power", "positive", e.power)
    for key in ("adam_beta1", "adam_beta2"):
        need(0.0 <= getattr(c, key) < 1.0, key, "in [0, 1)", getattr(c, key))
    need(c.adam_epsilon > 0, "adam_epsilon", "positive", c.adam_epsilon)
    need(c.adam_weight_decay >= 0, "adam_weight_decay", ">= 0", c.adam_weight_decay)
    need(c.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = no clipping)", c.max_grad_norm)
    need(c.noise_offset >= 0, "noise_offset", ">= 0", c.noise_offset)
    need(c.timestep_logit_std > 0, "timestep_logit_std", "positive", c.timestep_logit_std)
    need(c.lr_num_cycles >= 1, "lr_num_cycles", "at least 1", c.lr_num_cycles)
    need(c.lr_power > 0, "lr_power", "positive", c.lr_power)
    if c.lr_scheduler == "warmup_stable_decay":
        need(c.lr_decay_steps > 0, "lr_decay_steps", "at least 1 for warmup_stable_decay", c.lr_decay_steps)
        if c.lr_warmup_steps + c.lr_decay_steps > c.max_steps:
            raise UserError(f"lr_decay_steps {c.lr_decay_steps} + lr_warmup_steps {c.lr_warmup_steps} must fit in "
                            f"max_steps {c.max_steps} for warmup_stable_decay (else its decay never ends): shorten "
                            "them or train longer")
    v = c.validation
    if c.validate_every:
        need(v.num_inference_steps is None or v.num_inference_steps >= 1, "validation.num_inference_steps",
             "at least 1 (or null for the model's default)", v.num_inference_steps)
        for key in ("height", "width"):
            side = getattr(v, key)
            need(side is None or (side > 0 and side % 8 == 0), f"validation.{key}",
                 "a positive multiple of 8 (or null for the model's default)", side)


def default_warmup_steps(max_steps: int) -> int:
    """The warm-up when none is given: 10 % of the run, at most 500 steps (the fixed default it replaces, which ate
    all of a short run: with --max-steps 40 the rate never passed 8 % of its peak)."""
    return min(500, max_steps // 10)


def _resumed_warmup_steps(c: TrainConfig) -> int | None:
    """The warm-up of the run being resumed (its checkpoint's saved config): a run extended with a larger max_steps
    keeps it, instead of a longer default warm-up pulling the rate back down midway."""
    from ldm_pipeline.config import load_yaml
    from ldm_pipeline.training import checkpoints as ckpt

    if c.resume is None:
        return None
    checkpoint = ckpt.latest_checkpoint(c.output_dir) if c.resume == "latest" else Path(c.resume)
    saved = checkpoint / ckpt.CONFIG_FILE if checkpoint is not None else None
    if saved is None or not saved.is_file():
        return None
    value = load_yaml(saved).get("lr_warmup_steps")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def warmup_warning(c: TrainConfig, peak_lr: float) -> str | None:
    """One line when a resolved config's warm-up does not end within the run, else None.

    diffusers' warm-up uses rate · step / lr_warmup_steps at optimizer step ``step`` (0-based, so the first step
    runs at 0): the last of max_steps steps runs at rate · (max_steps - 1) / lr_warmup_steps.
    """
    if c.lr_scheduler == "constant" or c.lr_warmup_steps < c.max_steps:
        return None
    reached = peak_lr * (c.max_steps - 1) / c.lr_warmup_steps
    return (f"lr_warmup_steps {c.lr_warmup_steps} is not shorter than the run (max_steps {c.max_steps}): the "
            f"learning rate only reaches {reached:.2g} instead of {peak_lr:g}; pass e.g. --lr-warmup-steps "
            f"{default_warmup_steps(c.max_steps)}")
