"""Recipes: whole multi-stage jobs (data → autoencoder → tokenizer → diffusion model → evaluation) as one call."""
