"""The denoising objective: noise (with optional offset), the prediction target, and min-SNR-γ weighting.

Everything random draws from an explicit ``torch.Generator`` that the checkpoint saves, so a resumed run draws the
same noise and timesteps as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus a per-channel constant (offset noise, Guttenberg 2023,
    https://www.crosslabs.org/blog/diffusion-with-offset-noise) so the model can learn overall brightness."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=generator.device)
    return noise.to(latents.device)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device,
                     sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Training timesteps in [0, num_train_timesteps): uniform, or logit-normal (SD3's density, through diffusers'
    `compute_density_for_timestep_sampling`) mapped onto the discrete timesteps."""
    if sampling == "uniform":
        t = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)
        return t.to(device)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(sampling, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              device=generator.device, generator=generator)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1).to(device)


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = α·ε − σ·x₀ (Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}: use epsilon or v_prediction")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction
    (Min-SNR weighting, Hang et al. 2023, https://arxiv.org/abs/2303.09556)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # at t where SNR is 0 (zero-terminal-SNR schedules) ε-weighting divides by zero; such a step carries no signal
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-8), torch.ones_like(snr))


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, optionally weighted per sample."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weights.to(per_sample.device)).mean()
