"""`train_vae(config)`: stage 1 of a latent diffusion model, an AutoencoderKL trained on the training images.

The loop: build (or load) the VAE → hold out images → repeat until max_steps: encode → sample the posterior →
decode → reconstruction + KL (+ optional edge) loss → AdamW step with warm-up and cosine/linear decay → every
`eval_every` steps PSNR on the held-out images, every `checkpoint_every` steps an atomic checkpoint → final VAE
folder with ``scaling_factor`` in its config, metrics.json, a reconstruction grid and a loss curve.

Outputs in OUTPUT_DIR: ``vae/`` (diffusers AutoencoderKL folder, safetensors), ``metrics.json``,
``reconstructions.png`` (held-out originals over their reconstructions), ``loss_curve.png``,
``train_vae_config.yaml``, ``checkpoint-STEP/`` (resumable: ``resume="latest"``).

Single process (CPU or one GPU): the model is small enough that accelerate would only add start-up time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldm_pipeline.config import load_config, resolve_config_path, save_yaml, to_dict
from ldm_pipeline.data.config import DataConfig
from ldm_pipeline.errors import UserError
from ldm_pipeline.training.vae_metrics import (  # noqa: F401  (lr_lambda, psnr, ...: importable from here as before)
    edge_loss,
    evaluate,
    lr_lambda,
    psnr,
    reconstruction_grid,
    to_pil,
    vae_loss,
)

CONFIG_FILE = "train_vae_config.yaml"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class VAETrainConfig:
    """One autoencoder training run (`ldm train-vae`)."""

    # configs/models YAML (NAME, config:NAME or a path: its `vae:` block, random init), or an AutoencoderKL folder
    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)  # training images; captions are ignored (none needed)
    eval_data: str | None = None  # held-out images (any data source); None = the last shard of `data`
    output_dir: str = ""  # final VAE, checkpoints, metrics and pictures go here
    # --- schedule
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # images per step
    learning_rate: float = 1e-3  # peak learning rate (AdamW)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up, down to min_lr_ratio
    lr_warmup_steps: int | None = None  # steps of linear warm-up from 0; None = ldm train's default (10 %, <= 500)
    min_lr_ratio: float = 0.05  # final learning rate as a fraction of the peak
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99  # shorter second-moment memory than 0.999 suits runs of a few hundred steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    # --- objective
    reconstruction_loss: Literal["l1", "mse"] = "mse"  # mse optimises PSNR directly
    kl_weight: float = 1e-6  # KL to N(0, I), summed per image as in SD's autoencoder (which used 1e-6)
    edge_weight: float = 0.0  # L1 between image gradients (sharper edges); 0 = off
    logvar_bias_init: float | None = -8.0  # initial log-variance of a fresh posterior; None = diffusers' init (std≈1)
    # --- evaluation and outputs
    eval_every: int = 100  # steps between held-out PSNR evaluations; 0 = only at the end
    num_eval_images: int = 256  # held-out images for PSNR and the scaling factor
    eval_batch_size: int = 64
    scaling_latents: Literal["sample", "mean"] = "sample"  # latents whose 1/std is the scaling factor (SD: sample)
    num_grid_images: int = 16  # images in reconstructions.png
    # --- checkpoints and runtime
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only the final model
    checkpoints_total_limit: int | None = 1  # keep the newest N checkpoint-STEP dirs; None = all
    resume: str | None = None  # "latest" (none yet: a fresh start in output_dir) or a checkpoint-STEP path
    overwrite: bool = False  # allow a non-empty output_dir without resume (its contents are deleted)
    seed: int = 0  # seeds the random init and the posterior samples; data order is data.seed
    device: str = "auto"  # auto = cuda when available, else cpu
    num_threads: int | None = None  # torch CPU threads; None = torch's default (all cores). 1 is faster on a busy CPU
    progress_bar: bool = True  # tqdm


@dataclass
class VAETrainResult:
    output_dir: str
    vae_dir: str  # diffusers AutoencoderKL folder
    steps: int
    psnr: float  # dB, mean over held-out images, decoding the posterior mean
    scaling_factor: float  # 1 / std of held-out latents (see VAETrainConfig.scaling_latents)
    latent_mean: float  # mean of the same latents (should be near 0 for the diffusion stage)
    seconds: float  # training wall time (all sessions of a resumed run), evaluation included
    loss: float | None  # mean loss of the last (up to) 20 steps
    psnr_history: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)


def load_vae_train_config(path: str | Path | None = None, *layers: dict) -> VAETrainConfig:
    """Defaults < YAML (a path or a name under configs/train) < each layer (flags, then key=value overrides)."""
    if path is not None:
        path = resolve_config_path(path, "train")
    return load_config(VAETrainConfig, path, *layers)


def check_config(c: VAETrainConfig) -> None:
    """One-line errors for missing or out-of-range settings."""
    if not c.model:
        raise UserError("no model given: pass --model (a configs/models YAML with a vae: block, or an AutoencoderKL folder)")
    if not c.data.source:
        raise UserError("no training data given: pass --data (webdataset tars, parquet, an image folder or a HF dataset)")
    if not c.output_dir:
        raise UserError("no output directory given: pass --output-dir")
    if c.num_threads is not None and c.num_threads < 1:
        raise UserError(f"num_threads must be at least 1 (got {c.num_threads})")
    for name in ("max_steps", "batch_size", "num_eval_images", "eval_batch_size"):
        if getattr(c, name) < 1:
            raise UserError(f"{name} must be at least 1 (got {getattr(c, name)})")
    for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "kl_weight", "edge_weight", "num_grid_images",
                 "max_grad_norm", "weight_decay"):
        if getattr(c, name) < 0:
            raise UserError(f"{name} must be >= 0 (got {getattr(c, name)})")
    if c.learning_rate <= 0:
        raise UserError(f"learning_rate must be positive (got {c.learning_rate})")
    if not 0 <= c.min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio must be in [0, 1] (got {c.min_lr_ratio})")
    if c.checkpoints_total_limit is not None and c.checkpoints_total_limit < 1:
        raise UserError("checkpoints_total_limit must be at least 1 (or null for no limit)")
    if c.data.bucketing:
        raise UserError("data.bucketing is not supported by train-vae: it trains on square crops")
    if c.resume is not None and c.resume != "latest" and not Path(c.resume).exists():
        raise UserError(f"resume {c.resume}: no such checkpoint (pass 'latest' or a checkpoint-STEP folder)")


# --- the model ------------------------------------------------------------------------------------------------


def moments_conv(vae):
    """The 1×1 conv whose output is the posterior's [mean, logvar] (quant_conv, or the encoder's last conv)."""
    return vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out


def init_logvar_bias(vae, value: float) -> None:
    """Start the posterior nearly deterministic: log-variance bias `value` (std = exp(value / 2)).

    With diffusers' init the posterior std starts near 1, so the decoder sees almost pure noise and the
    reconstruction barely improves for hundreds of steps; a small KL weight would take thousands to shrink it.
    """
    import torch

    conv = moments_conv(vae)
    c = vae.config.latent_channels
    with torch.no_grad():
        conv.bias[c:].fill_(value)


def build_vae(config: VAETrainConfig):
    """A fresh AutoencoderKL from an architecture YAML's `vae:` block (seeded, logvar bias applied), or a saved one.

    Returns (vae, source) where source is "config" or "folder". A saved VAE keeps its weights as they are.
    """
    import torch
    from diffusers import AutoencoderKL

    path = Path(config.model).expanduser()
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (sub / "config.json").is_file():
            raise UserError(f"{path} is not an AutoencoderKL folder (no config.json, nor vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(str(sub), local_files_only=True), "folder"
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load {sub} as an AutoencoderKL: {_first_line(e)}") from None
    from ldm_pipeline.config import load_yaml
    from ldm_pipeline.models import CONFIG_PREFIX

    # stage 1 needs only the VAE part of an architecture, so a YAML holding just `vae:` is enough; `config:NAME` is
    # the form `ldm train --model` needs for random weights, accepted here too
    data = load_yaml(resolve_config_path(config.model.removeprefix(CONFIG_PREFIX), "models"))
    kwargs = data.get("vae")
    if not isinstance(kwargs, dict):
        raise UserError(f"model config {config.model} has no `vae:` mapping of AutoencoderKL arguments")
    torch.manual_seed(config.seed)
    try:
        vae = AutoencoderKL(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad vae: arguments in {config.model}: {_first_line(e)}") from None
    if config.logvar_bias_init is not None:
        init_logvar_bias(vae, config.logvar_bias_init)
    return vae, "config"


# --- data -----------------------------------------------------------------------------------------------------


def split_sources(config: VAETrainConfig):
    """(training shards, held-out shards): the last shard of `data` is held out unless `eval_data` is given."""
    from ldm_pipeline.data.sources import open_sources

    d = config.data
    train = open_sources(d.source, d.format, d.image_column, d.caption_column, min_shards=max(1, d.num_workers),
                         shuffle_buffer=d.shuffle_buffer, hf_split=d.hf_split)
    if config.eval_data:
        held = open_sources(config.eval_data, "auto", d.image_column, d.caption_column, shuffle_buffer=0,
                            hf_split=d.hf_split)
        return train, held
    if len(train) < 2:
        raise UserError(f"data source '{d.source}' is a single shard: hold-out needs 2+ shards (the last is held out),"
                        " or pass eval_data")
    return train[:-1], train[-1:]


def load_eval_images(shards, config: VAETrainConfig):
    """The first `num_eval_images` held-out images in stored order (center crop, no flip), as [N,3,H,W] in [-1,1]."""
    import torch

    from ldm_pipeline.data.dataset import ShardedCaptionDataset

    cfg = dataclasses.replace(config.data, shuffle=False, random_flip=False, center_crop=True, num_workers=0,
                              caption_dropout=0.0)
    dataset = ShardedCaptionDataset(shards, cfg, batch_size=config.eval_batch_size)
    out, n = [], 0
    for batch in dataset:
        if batch["state"]["epoch"] > 0 or n >= config.num_eval_images:
            break  # stop after one pass: a small held-out set is not repeated
        out.append(batch["pixel_values"])
        n += len(batch["pixel_values"])
    if not out:
        raise UserError("the held-out data has no usable image")
    return torch.cat(out)[: config.num_eval_images]


# --- checkpoints (the same folders, atomic publication, output-dir rules and resume as `ldm train`) ---------------


def save_checkpoint(output_dir: Path, step: int, vae, optimizer, scheduler, state: dict[str, Any],
                    limit: int | None) -> Path:
    """``checkpoint-STEP/``: vae/, optimizer.pt and training_state.json, published whole (`checkpoints`)."""
    import torch

    from ldm_pipeline.training import checkpoints as ckpt

    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        ckpt.write_json(tmp / ckpt.STATE_FILE, {"global_step": step, **state})  # last: marks a complete checkpoint

    return ckpt.save_checkpoint(output_dir, step, write, limit)


def _prepare_output(c: VAETrainConfig) -> tuple[Path, Path | None]:
    """The output dir, and the checkpoint to resume from (None = fresh start); refuses to mix runs, as `ldm train`
    does (resume=latest without a checkpoint yet starts afresh in the same directory)."""
    from ldm_pipeline.training import checkpoints as ckpt

    out = Path(c.output_dir)
    resume = ckpt.prepare_output_dir(out, c.resume, c.overwrite)
    if resume is not None:
        ckpt.set_aside_future(out, ckpt.checkpoint_step(resume))
    return out, resume


# --- the loop -------------------------------------------------------------------------------------------------


def effective_config(config: VAETrainConfig) -> VAETrainConfig:
    """The config as the run uses and records it: an autoencoder needs no captions, so none are required; the
    warm-up defaults as `ldm train`'s does."""
    from ldm_pipeline.training.config import default_warmup_steps

    warmup = config.lr_warmup_steps
    if warmup is None:
        warmup = default_warmup_steps(config.max_steps) if config.max_steps >= 1 else 0
    return dataclasses.replace(config, data=dataclasses.replace(config.data, allow_empty_captions=True),
                               lr_warmup_steps=warmup)


def train_vae(config: VAETrainConfig) -> VAETrainResult:
    """Train (or fine-tune) an AutoencoderKL; see the module docstring for the loop and outputs."""
    import torch

    from ldm_pipeline.extras import check_packages
    from ldm_pipeline.training.packages import data_packages

    c = effective_config(config)
    check_config(c)
    need = data_packages(c.data.source, c.data.format)
    if c.eval_data:
        need.update(data_packages(c.eval_data))
    check_packages(need, "VAE training")  # before the output dir or the model is touched
    if c.lr_warmup_steps >= c.max_steps:
        reached = c.learning_rate * c.max_steps / (c.lr_warmup_steps + 1)  # lr_factor's last step
        print(f"ldm train-vae: warning: lr_warmup_steps {c.lr_warmup_steps} is not shorter than the run (max_steps "
              f"{c.max_steps}): the learning rate only reaches {reached:.2g} instead of {c.learning_rate:g}",
              file=sys.stderr)
    device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if c.device == "auto" else c.device))
    threads = torch.get_num_threads()
    if c.num_threads:
        # OpenMP threads spin-wait on each other: on a CPU shared with other jobs, 2 threads ran ~4x slower per
        # step than 1 (measured here), so a busy machine wants fewer threads than cores
        torch.set_num_threads(c.num_threads)
    try:
        return _train(c, device)
    finally:
        torch.set_num_threads(threads)  # process-wide setting: give it back to the caller


@dataclass
class _VAEState:
    """What a VAE checkpoint restores besides the weights, optimizer and LR schedule."""

    step: int = 0
    seconds: float = 0.0  # training wall time of the earlier sessions
    losses: list[tuple[int, float]] = field(default_factory=list)
    psnr_history: list[tuple[int, float]] = field(default_factory=list)
    data: dict[str, Any] | None = None  # LoaderState dict


def _restore(resume: Path, vae, optimizer, scheduler, gen, device) -> tuple[Any, _VAEState]:
    """Load a checkpoint into the optimizer, LR schedule, generators; returns (its VAE, its state)."""
    import torch
    from diffusers import AutoencoderKL

    from ldm_pipeline.training import checkpoints as ckpt

    saved_state = json.loads((resume / ckpt.STATE_FILE).read_text())
    vae.load_state_dict(AutoencoderKL.from_pretrained(str(resume / "vae"), local_files_only=True).state_dict())
    saved = torch.load(resume / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["lr_scheduler"])
    gen.set_state(ckpt.decode_bytes(saved_state["generator"]))
    torch.set_rng_state(ckpt.decode_bytes(saved_state["torch_rng"]))
    return vae, _VAEState(int(saved_state.get("global_step", saved_state.get("step", 0))),
                          float(saved_state["seconds"]), [tuple(x) for x in saved_state["losses"]],
                          [tuple(x) for x in saved_state["psnr_history"]], saved_state["data"])


def _train(c: VAETrainConfig, device) -> VAETrainResult:
    import torch
    from tqdm.auto import tqdm

    from ldm_pipeline.data.dataset import LoaderState, ShardedCaptionDataset, make_dataloader
    from ldm_pipeline.training import checkpoints as ckpt

    train_shards, eval_shards = split_sources(c)
    vae, source = build_vae(c)  # before touching the output dir: a bad model spec leaves nothing behind
    out, resume = _prepare_output(c)
    save_yaml(c, out / CONFIG_FILE)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                  weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, c))
    gen = torch.Generator(device=device).manual_seed(c.seed)  # posterior samples
    state = _VAEState()
    if resume is not None:
        vae, state = _restore(resume, vae, optimizer, scheduler, gen, device)
    resumed_step = state.step if resume is not None else None
    loader_state = LoaderState.from_dict(state.data) if state.data else LoaderState()

    def save() -> None:
        save_checkpoint(out, state.step, vae, optimizer, scheduler, {
            "step": state.step, "seconds": time.perf_counter() - t0, "losses": state.losses,
            "psnr_history": state.psnr_history, "generator": ckpt.encode_bytes(gen.get_state()),
            "torch_rng": ckpt.encode_bytes(torch.get_rng_state()), "data": loader_state.to_dict(),
            "model_source": source,
        }, c.checkpoints_total_limit)

    eval_images = load_eval_images(eval_shards, c)
    dataset = ShardedCaptionDataset(train_shards, c.data, c.batch_size)
    it = iter(make_dataloader(dataset, c.data.num_workers, loader_state if resume is not None else None))
    bar = tqdm(total=c.max_steps, initial=state.step, disable=not c.progress_bar, desc="train-vae", dynamic_ncols=True)
    t0 = time.perf_counter() - state.seconds
    saved_step = resumed_step
    while state.step < c.max_steps:
        batch = next(it)
        value = _step(vae, optimizer, scheduler, batch["pixel_values"].to(device), gen, c, state.step)
        loader_state.update(batch["state"])
        state.step += 1
        state.losses.append((state.step, value))
        bar.update(1)
        postfix = {"loss": f"{value:.4g}", "lr": f"{scheduler.get_last_lr()[0]:.2g}"}
        if c.eval_every and state.step % c.eval_every == 0 and state.step < c.max_steps:
            state.psnr_history.append((state.step, evaluate(vae, eval_images, c, device)["psnr"]))
            bar.write(f"train-vae: step {state.step}: held-out PSNR {state.psnr_history[-1][1]:.2f} dB "
                      f"({time.perf_counter() - t0:.0f} s)")
        if state.psnr_history:
            postfix["psnr"] = f"{state.psnr_history[-1][1]:.2f}"
        bar.set_postfix(postfix, refresh=False)
        if c.checkpoint_every and state.step % c.checkpoint_every == 0:
            save()
            saved_step = state.step
    bar.close()
    if state.step > 0 and state.step != saved_step:
        save()  # the last step always (checkpoint_every=0 too), so resume=latest continues or extends this run
    return _finish(c, out, vae, eval_images, state, time.perf_counter() - t0, device)


def _step(vae, optimizer, scheduler, x, gen, c: VAETrainConfig, step: int) -> float:
    """One optimizer step on images `x`; returns the loss."""
    import torch

    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    loss, _ = vae_loss(x, recon, posterior, c)
    value = loss.item()
    if not math.isfinite(value):
        raise UserError(f"loss became {value} at step {step}: lower learning_rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if c.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(vae.parameters(), c.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return value


def _finish(c: VAETrainConfig, out: Path, vae, eval_images, state: _VAEState, seconds: float,
            device) -> VAETrainResult:
    """Final evaluation (PSNR, scaling factor), vae/ with it, the pictures and metrics.json."""
    from ldm_pipeline.training import checkpoints as ckpt
    from ldm_pipeline.training.validation import draw_loss_curve

    final = evaluate(vae, eval_images, c, device, latents=True)
    history = [*state.psnr_history, (state.step, final["psnr"])]
    vae.register_to_config(scaling_factor=final["scaling_factor"])
    vae_dir = _save_vae(vae, out / "vae")
    reconstruction_grid(eval_images, final["reconstructions"], c.num_grid_images).save(out / "reconstructions.png")
    draw_loss_curve([s for s, _ in state.losses], [v for _, v in state.losses], out / "loss_curve.png")
    recent = [v for _, v in state.losses[-20:]]
    result = VAETrainResult(
        output_dir=str(out), vae_dir=str(vae_dir), steps=state.step, psnr=final["psnr"],
        scaling_factor=final["scaling_factor"], latent_mean=final["latent_mean"], seconds=seconds,
        loss=sum(recent) / len(recent) if recent else None, psnr_history=history, losses=state.losses,
    )
    metrics = {k: v for k, v in to_dict(result).items() if k != "losses"}
    metrics.update(num_eval_images=len(eval_images), scaling_latents=c.scaling_latents, device=str(device),
                   seconds_per_step=seconds / max(1, state.step))
    ckpt.write_json(out / "metrics.json", metrics)
    return result


def _save_vae(vae, final: Path) -> Path:
    """save_pretrained into a temporary folder, then rename into place."""
    from ldm_pipeline.files import atomic_dir

    with atomic_dir(final, overwrite=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return final


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
