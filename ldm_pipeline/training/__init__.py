"""Training: `train(config)` fine-tunes, LoRA-trains or trains from scratch a latent diffusion model (accelerate).

    from ldm_pipeline.training import load_train_config, train
    result = train(load_train_config("tiny_test", {"model": "config:tiny", "output_dir": "runs/t",
                                                   "data": {"source": "shards"}}))

Modules: config (TrainConfig), loop (train: the loop, top to bottom), state (TrainState: what a checkpoint restores
besides accelerate's state), setup (the accelerator, models and data of a run), step (train_step, TrainHooks),
outputs (checkpoints, validation grids, final model and card), checkpoints (atomic save, latest, limit, output dir,
resume checks; shared with vae), vae (train_vae: the autoencoder stage; vae_metrics its loss and PSNR), caching (latent and
text-embedding cache), validation (sample grids, loss curve), lora (peft adapters, and their kohya-format copy), losses
(noise, targets, min-SNR), xl (SDXL's conditioning: both text encoders, pooled embedding, size/crop time ids, and its
fp16 VAE rule), packages (the optional packages a run needs, checked up front).
"""

from ldm_pipeline.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "TrainHooks", "TrainResult", "TrainingDiverged", "load_train_config", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult", "TrainingDiverged", "TrainHooks"):
        from ldm_pipeline.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'ldm_pipeline.training' has no attribute {name!r}")
