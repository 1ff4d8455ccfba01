"""One optimizer step: a gradient-accumulation window of micro-batches (encode → noise → UNet → loss → backward),
then either a skip (a NaN/inf loss on any rank, or fp16's grad scaler finding inf/NaN gradients) or clip →
optimizer → LR → EMA. `train_step` changes only the `TrainState` it is given and the run's optimizer/EMA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldm_pipeline.training import losses, xl
from ldm_pipeline.training.setup import Data, Run
from ldm_pipeline.training.state import TrainState


@dataclass
class TrainHooks:
    """Optional callbacks for tests and debugging (`train(config, hooks=...)`); each sees the live state."""

    on_batch: Callable[[TrainState, dict], None] | None = None  # each micro-batch, before its loss
    after_loss: Callable[[TrainState, Any], Any] | None = None  # each micro-batch's loss → the loss to backpropagate
    after_step: Callable[[TrainState], None] | None = None  # after each optimizer step (not after a skipped one)
    on_end: Callable[[Run, TrainState], None] | None = None  # after the last step, before the final outputs


@dataclass
class StepResult:
    loss: float | None  # mean loss over ranks and micro-batches; None when it was not finite
    skipped: str | None = None  # why the step did not count: "nan" (loss) or "scaler" (fp16 gradients), else None
    grad_norm: float | None = None
    epochs_done: int = 0  # data epochs every rank has finished


def encode_latents(run: Run, batch, generator):
    """Scaled latents of the batch: the VAE's posterior sample (encoded in `run.vae_dtype`: fp32 for SDXL's VAE under
    fp16), or the cached posterior's (see caching.py)."""
    import torch

    device, vae = run.accelerator.device, run.vae
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device, torch.float32)
        std = batch["latent_std"].to(device, torch.float32)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(device)
        latents = mean + std * eps
    else:
        with torch.no_grad():
            px = batch["pixel_values"].to(device, run.vae_dtype or run.weight_dtype)
            latents = vae.encode(px).latent_dist.sample(generator=generator).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def encode_text(run: Run, batch):
    """The SD text encoder's last hidden states of the batch's captions (or the cached ones); SDXL: `xl.encode_text`."""
    import torch

    if "prompt_embeds" in batch:
        return batch["prompt_embeds"].to(run.accelerator.device, run.weight_dtype)
    ids = batch["input_ids"].to(run.accelerator.device)
    if run.train_te:
        return run.text_encoder(ids, return_dict=False)[0]
    with torch.no_grad():
        return run.text_encoder(ids, return_dict=False)[0]


def compute_loss(run: Run, batch, generator):
    """The diffusion loss of one micro-batch; noise, timesteps and latent samples come from `generator`."""
    c, sched = run.config, run.noise_scheduler
    latents = encode_latents(run, batch, generator)
    noise = losses.sample_noise(latents, generator, c.noise_offset)
    timesteps = losses.sample_timesteps(latents.shape[0], sched.config.num_train_timesteps, generator,
                                        run.accelerator.device, c.timestep_sampling, c.timestep_logit_mean,
                                        c.timestep_logit_std)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = losses.target_for(sched, latents, noise, timesteps)
    if run.xl:  # pooled text and size/crop conditioning besides the hidden states
        hidden, added = xl.unet_conditioning(run, batch, latents)
        pred = run.unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
    else:
        pred = run.unet(noisy, timesteps, encode_text(run, batch), return_dict=False)[0]
    weights = losses.min_snr_weights(sched, timesteps, c.snr_gamma) if c.snr_gamma else None
    return losses.diffusion_loss(pred, target, weights)


def _accumulate(run: Run, data: Data, state: TrainState, hooks: TrainHooks):
    """Forward and backward over one accumulation window; returns (summed loss tensor, samples)."""
    import torch

    loss_sum = torch.zeros((), device=run.accelerator.device)
    n_samples = 0
    for _ in range(run.config.gradient_accumulation_steps):
        batch = next(data.batches)
        if hooks.on_batch:
            hooks.on_batch(state, batch)
        # the accumulate context skips DDP's gradient all-reduce on all but the window's last micro-batch
        with run.accelerator.accumulate(*run.trained):
            loss = compute_loss(run, batch, state.noise_generator)
            if hooks.after_loss:
                loss = hooks.after_loss(state, loss)
            run.accelerator.backward(loss)
        loss_sum += loss.detach().float()
        n_samples += len(batch["keys"])
        data.update(batch["state"])
    return loss_sum, n_samples


def train_step(run: Run, data: Data, state: TrainState, hooks: TrainHooks | None = None) -> StepResult:
    """One optimizer step (or a skipped one); updates `state` (step, samples, losses, bad-step counters)."""
    import torch

    hooks = hooks or TrainHooks()
    accelerator, world = run.accelerator, run.accelerator.num_processes
    loss_sum, n_samples = _accumulate(run, data, state, hooks)
    # one collective per optimizer step: summed loss, samples, whether any rank saw a non-finite loss (every rank
    # must take the same decision, or DDP ranks would diverge) and the data epochs all ranks finished
    bad_local = 0.0 if torch.isfinite(loss_sum) else 1.0
    mine = torch.tensor([[loss_sum.nan_to_num(0.0).item(), float(n_samples), bad_local, float(data.epoch())]],
                        device=accelerator.device)
    rows = accelerator.gather(mine).reshape(-1, 4) if world > 1 else mine
    totals, epochs_done = rows[:, :3].sum(0), int(rows[:, 3].min().item())
    if totals[2].item() > 0:
        # skip: no optimizer/LR/EMA step; zeroing the NaN gradients before the grad scaler unscales them
        run.optimizer.zero_grad(set_to_none=True)
        state.bad_steps += 1
        state.bad_in_a_row += 1
        return StepResult(None, "nan", epochs_done=epochs_done)
    state.bad_in_a_row = 0
    grad_norm = None
    if accelerator.sync_gradients and run.config.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(run.trained_params, run.config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = totals[0].item() / (run.config.gradient_accumulation_steps * world)
    if accelerator.optimizer_step_was_skipped:
        # fp16: the grad scaler found inf/NaN gradients, skipped the update and lowered its scale; not a step, so
        # the LR schedule, EMA and step counter stay where they are (the same data is not seen again)
        state.scaler_skips += 1
        return StepResult(step_loss, "scaler", epochs_done=epochs_done)
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.step(run.trained_params)
    state.global_step += 1
    state.samples_seen += int(totals[1].item())
    state.losses.append((state.global_step, step_loss))
    return StepResult(step_loss, None, None if grad_norm is None else float(grad_norm), epochs_done)
