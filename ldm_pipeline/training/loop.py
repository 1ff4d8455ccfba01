"""`train(config)`: fine-tune (or LoRA-train, or train from scratch) a latent diffusion model with accelerate.

The loop, in order (each part a function of its own): accelerator → output dir and the checkpoint to resume from →
models, optimizer, LR schedule, EMA (`setup.setup_models`) → resume checks and `TrainState` → data stream or latent
cache (`setup.setup_data`) → repeat until max_steps: `step.train_step` (accumulation window, skip on NaN/inf or an
fp16 grad-scaler skip, clip, optimizer/LR/EMA) → log, validate, checkpoint (the last step always) → final model +
model card + loss curve (`outputs`).

Step counting is per optimizer step everywhere (max_steps, LR schedule, checkpoint and validation intervals), for any
number of processes and accumulation steps; the accumulation count is accelerate's (our config, unless
``accelerate launch`` or a DeepSpeed config sets it). What FSDP and DeepSpeed support is decided in `parallel`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.config import save_yaml, to_dict
from ldm_pipeline.data.stats import merge_stat_dicts, summarize
from ldm_pipeline.training import checkpoints as ckpt
from ldm_pipeline.training import outputs
from ldm_pipeline.training.config import TrainConfig, resolve
from ldm_pipeline.training.setup import Data, Run, log, make_accelerator, setup_data, setup_models
from ldm_pipeline.training.state import TrainState
from ldm_pipeline.training.step import StepResult, TrainHooks, train_step


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


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Run one training job; raises UserError for bad input and TrainingDiverged after max_bad_steps NaN losses.
    `hooks` are callbacks for tests and debugging (see `step.TrainHooks`)."""
    from ldm_pipeline.extras import check_packages
    from ldm_pipeline.training.packages import train_packages

    config = resolve(config)
    check_packages(train_packages(config), "training")  # before the output dir or a model is touched
    accelerator = make_accelerator(config)
    result = _train(config, accelerator, hooks or TrainHooks())
    # The process group goes only after every rank has dropped _train's DDP-wrapped models (on its return, and by
    # free_memory's gc): a 2-process gloo run hung, 2 times in about 15, while they were freed after end_training.
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _train(config: TrainConfig, accelerator, hooks: TrainHooks) -> TrainResult:
    import torch
    from accelerate.utils import set_seed

    # micro-batches per optimizer step: accelerate's count, which `accelerate launch --gradient_accumulation_steps`
    # or a DeepSpeed config may have set; the run is recorded (and compared on resume) with what it really does
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        log(accelerator, f"gradient accumulation {accelerator.gradient_accumulation_steps} from accelerate's settings "
                         f"(instead of gradient_accumulation_steps={config.gradient_accumulation_steps})")
        config = dataclasses.replace(config, gradient_accumulation_steps=accelerator.gradient_accumulation_steps)
    resume_from = ckpt.prepare_output_dir(config.output_dir, config.resume, config.overwrite,
                                          accelerator.process_index, accelerator.is_main_process,
                                          accelerator.wait_for_everyone)
    if config.deterministic:  # cuBLAS reads it when its first handle is made, which is after this point
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # model init of configs/models YAMLs (resume restores the RNG states anyway); deterministic kernels if asked
    set_seed(config.seed, deterministic=config.deterministic)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    run = setup_models(config, accelerator)
    state = _start_state(run, resume_from)
    data = setup_data(run, state.data)
    state.data_epoch = data.epoch()
    if accelerator.is_main_process:
        save_yaml(config, run.out / ckpt.CONFIG_FILE)
        accelerator.init_trackers("ldm_train", config=outputs.flat_hparams(config))
    _log_plan(run)
    saved = _loop(run, data, state, hooks, resumed_step=state.global_step if resume_from else None)
    if hooks.on_end:
        hooks.on_end(run, state)
    return _finish(run, data, state, saved)


def _start_state(run: Run, checkpoint: Path | None) -> TrainState:
    """A fresh `TrainState`, or the checkpoint's, with accelerate's state loaded, after the resume checks."""
    import torch

    accelerator, config = run.accelerator, run.config
    rank = accelerator.process_index
    # noise, timesteps and latent sampling draw from this generator (per rank), saved with every checkpoint
    gen = torch.Generator(device=accelerator.device).manual_seed((config.seed * 1_000_003 + rank) % (2**63))
    state = TrainState(noise_generator=gen)
    if checkpoint is None:
        if config.resume == "latest":
            log(accelerator, f"no checkpoint in {run.out} yet: starting a new run")
        return state
    if not config.allow_resume_changes:
        ckpt.check_resume(checkpoint, ckpt.CONFIG_FILE, to_dict(config), run.info.hash, config.cache_latents)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # checkpoints after the one we resume from belong to an abandoned future
        moved = ckpt.set_aside_future(run.out, ckpt.checkpoint_step(checkpoint))
        if moved:
            log(accelerator, f"resuming from {checkpoint.name}: set aside the later "
                             f"{', '.join(p.name for p in moved)} (not resumed from, not pruned)")
    accelerator.wait_for_everyone()
    log(accelerator, f"resuming from {checkpoint}")
    state.load(checkpoint, rank, accelerator.num_processes)  # checks the number of processes first
    accelerator.load_state(str(checkpoint), strict=not run.use_lora)
    if run.ema is not None:
        run.ema.to(accelerator.device)
    return state


def _log_plan(run: Run) -> None:
    c, accelerator = run.config, run.accelerator
    world, accum = accelerator.num_processes, c.gradient_accumulation_steps
    log(accelerator, f"{c.max_steps} steps of {c.batch_size * accum * world} samples ({world} process(es) x batch "
                     f"{c.batch_size} x {accum} accumulation), lr {run.lr:g} ({c.lr_scheduler}"
                     f"{f', warm-up {c.lr_warmup_steps}' if c.lr_warmup_steps else ''}), "
                     f"{'LoRA rank ' + str(c.lora.rank) if run.use_lora else 'full fine-tuning'}"
                     f"{(' + text encoders' if run.xl else ' + text encoder') if run.train_te else ''}, "
                     f"{'SDXL, ' if run.xl else ''}mixed precision {accelerator.mixed_precision}")
    s = run.sampling
    if c.validate_every and s.prompts:
        origin = ("config" if c.validation.prompts is not None else
                  "model's examples" if run.info.defaults.example_prompts else "generic")
        log(accelerator, f"samples every {c.validate_every} steps: {len(s.prompts)} prompts ({origin}), "
                         f"{s.width}x{s.height}, {s.num_inference_steps} steps {s.scheduler}, CFG {s.guidance_scale:g}")


def _loop(run: Run, data: Data, state: TrainState, hooks: TrainHooks, resumed_step: int | None) -> list[str]:
    """Optimizer steps until max_steps, with logging, validation and checkpoints; returns the checkpoints saved."""
    from tqdm.auto import tqdm

    c, accelerator = run.config, run.accelerator
    saved: list[str] = []
    bar = tqdm(total=c.max_steps, initial=state.global_step, desc="training", unit="step",
               disable=not (accelerator.is_main_process and c.progress_bar), dynamic_ncols=True)
    try:
        while state.global_step < c.max_steps:
            t0 = time.perf_counter()
            result = train_step(run, data, state, hooks)
            if result.epochs_done > state.data_epoch and data.loader_state is not None:
                _report_data(run, data, state, result.epochs_done)
            if result.skipped:
                _skipped(run, state, result)
                continue
            state.train_seconds += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
            _log_step(run, state, result)
            step = state.global_step
            if c.validate_every and step % c.validate_every == 0:
                outputs.validate(run, step)
            if c.checkpoint_every and step % c.checkpoint_every == 0:
                saved.append(str(outputs.save_checkpoint(run, state, data)))
            if hooks.after_step:
                hooks.after_step(state)
        last = state.global_step
        if last > 0 and last != resumed_step and not (saved and saved[-1].endswith(f"checkpoint-{last}")):
            saved.append(str(outputs.save_checkpoint(run, state, data)))  # the last step always, so a later run can
            # extend this one (checkpoint_every=0 too)
    finally:
        bar.close()
    return saved


def _skipped(run: Run, state: TrainState, result: StepResult) -> None:
    """Log a skipped step; raise TrainingDiverged after max_bad_steps NaN/inf losses in a row."""
    step = state.global_step + 1
    if result.skipped == "scaler":
        log(run.accelerator, f"step {step}: fp16 gradients overflowed, the grad scaler skipped the update "
                             f"(not counted as a step; {state.scaler_skips} so far)")
        return
    log(run.accelerator, f"step {step}: non-finite loss, step skipped "
                         f"({state.bad_in_a_row} in a row, {state.bad_steps} in total)")
    if state.bad_in_a_row >= run.config.max_bad_steps:
        last = ckpt.latest_checkpoint(run.out)
        raise TrainingDiverged(
            f"loss was NaN/inf for {state.bad_in_a_row} optimizer steps in a row at step {step}; "
            f"stopped (last good checkpoint: {last or 'none'}). Lower the learning rate or check the data.")


def _log_step(run: Run, state: TrainState, result: StepResult) -> None:
    if state.global_step % run.config.log_every:
        return
    logs = {"train/loss": result.loss, "train/lr": run.lr_scheduler.get_last_lr()[0],
            "train/samples_seen": state.samples_seen, "train/bad_steps": state.bad_steps}
    if result.grad_norm is not None:
        logs["train/grad_norm"] = result.grad_norm
    run.accelerator.log(logs, step=state.global_step)


def _report_data(run: Run, data: Data, state: TrainState, epochs_done: int) -> None:
    """Collective: the data summary of all ranks' finished epochs, on the console and to the trackers."""
    from accelerate.utils import gather_object

    merged = merge_stat_dicts(gather_object([data.loader_state.finished_epochs_stats().to_dict()]))
    log(run.accelerator, f"data after epoch {epochs_done}: {summarize(merged)}")
    run.accelerator.log({"data/seen": merged["seen"], "data/used": merged["used"],
                         "data/skipped": sum(merged["skipped"].values()), "data/epochs": epochs_done},
                        step=state.global_step)
    state.data_epoch = epochs_done


def _finish(run: Run, data: Data, state: TrainState, saved: list[str]) -> TrainResult:
    """Collective: gather the data statistics (and an FSDP-sharded UNet), then the main process saves the final
    model, card, metrics and loss curve."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    mine = data.loader_state.stats().to_dict() if data.loader_state is not None else (data.cache_stats or {})
    data_stats = merge_stat_dicts(gather_object([mine]))
    # under FSDP every rank holds a shard: gather the whole UNet (a collective) before the main process saves it
    fsdp = str(accelerator.distributed_type).endswith("FSDP")
    full_unet = outputs.gathered_unet(accelerator, run.unet) if fsdp and not run.use_lora else None
    accelerator.wait_for_everyone()
    final_dir = run.out / "final"
    if accelerator.is_main_process:
        outputs.save_final(run, state, data_stats, full_unet)
        log(accelerator, f"data: {summarize(data_stats)}")
        log(accelerator, f"done: {state.global_step} steps, {state.samples_seen} samples, loss "
                         f"{state.mean_recent_loss()}; model in {final_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(str(run.out), str(final_dir), state.global_step, state.samples_seen, state.mean_recent_loss(),
                       state.bad_steps, list(state.losses), data_stats, saved, state.train_seconds,
                       data.cache_seconds)
