"""The autoencoder stage's objective and measurements (`train_vae`): LR factor, reconstruction + KL (+ edge) loss,
PSNR, the held-out evaluation that gives the latent scaling factor, and the reconstruction grid."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm_pipeline.training.vae import VAETrainConfig


# --- loss, metrics, schedule ----------------------------------------------------------------------------------


def lr_lambda(step: int, c: VAETrainConfig) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine or linear decay to `min_lr_ratio`."""
    if step < c.lr_warmup_steps:
        return (step + 1) / (c.lr_warmup_steps + 1)
    if c.lr_scheduler == "constant":
        return 1.0
    t = min(1.0, (step - c.lr_warmup_steps) / max(1, c.max_steps - c.lr_warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * t)) if c.lr_scheduler == "cosine" else 1 - t
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * decay


def vae_loss(x, recon, posterior, c: VAETrainConfig) -> tuple[Any, dict[str, float]]:
    """Reconstruction (per pixel) + kl_weight · KL + edge_weight · gradient L1; returns (loss, parts).

    KL is summed over latent elements and divided by the pixel count, so kl_weight means what it does in SD's
    autoencoder (summed reconstruction + 1e-6 · summed KL) up to that common factor.
    """
    import torch.nn.functional as F

    rec = F.mse_loss(recon, x) if c.reconstruction_loss == "mse" else F.l1_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()
    loss = rec + c.kl_weight * kl
    parts = {"rec": rec.item(), "kl": kl.item()}
    if c.edge_weight > 0:
        edge = edge_loss(x, recon)
        loss = loss + c.edge_weight * edge
        parts["edge"] = edge.item()
    return loss, parts


def edge_loss(x, recon):
    """L1 between horizontal and vertical finite differences of the two images."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def psnr(x, y):
    """Per-image PSNR in dB of images in [-1, 1] (compared in [0, 1], reconstructions clamped)."""
    import torch

    a = (x.clamp(-1, 1) + 1) / 2
    b = (y.clamp(-1, 1) + 1) / 2
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def evaluate(vae, images, c: VAETrainConfig, device, latents: bool = False) -> dict[str, Any]:
    """Held-out PSNR (decoding the posterior mean); with `latents`, also the scaling factor and reconstructions.

    The scaling factor is 1/std over all elements of the held-out latents: posterior samples by default, as SD
    computed its 0.18215 (``scaling_latents="mean"`` uses the means). Samples come from a fixed generator, so the
    training RNG is untouched.
    """
    import torch

    was_training = vae.training
    vae.eval()
    gen = torch.Generator(device=device).manual_seed(c.seed + 1)
    scores, zs, recons = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), c.eval_batch_size):
            x = images[i : i + c.eval_batch_size].to(device)
            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.mode()).sample
            scores.append(psnr(x, y).cpu())
            if latents:
                z = posterior.sample(generator=gen) if c.scaling_latents == "sample" else posterior.mode()
                zs.append(z.float().cpu())
                recons.append(y.cpu())
    vae.train(was_training)
    out: dict[str, Any] = {"psnr": float(torch.cat(scores).mean())}
    if latents:
        z = torch.cat(zs)
        out.update(scaling_factor=float(1 / z.std()), latent_mean=float(z.mean()), latent_std=float(z.std()),
                   reconstructions=torch.cat(recons))
    return out


def to_pil(t):
    """[3,H,W] in [-1,1] → PIL image."""
    import numpy as np
    from PIL import Image

    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def reconstruction_grid(originals, reconstructions, n: int, scale: int = 2):
    """Originals in the top row, their reconstructions below, upscaled `scale`× (nearest) to be seen."""
    from PIL import Image

    n = min(n, len(originals))
    h, w = originals.shape[-2] * scale, originals.shape[-1] * scale
    grid = Image.new("RGB", (max(1, n) * w, 2 * h), "white")
    for i in range(n):
        for row, t in enumerate((originals[i], reconstructions[i])):
            grid.paste(to_pil(t).resize((w, h), Image.Resampling.NEAREST), (i * w, row * h))
    return grid
