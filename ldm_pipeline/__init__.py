"""ldm_pipeline: latent text-to-image diffusion on the Hugging Face stack.

Python API (heavy libraries are imported on first use, so ``import ldm_pipeline`` is instant)::

    from ldm_pipeline import Generator, RuntimeOptions
    gen = Generator.load("path/to/model", RuntimeOptions(device="auto", dtype="fp32"))
    images = gen.txt2img("a red circle on a blue background", seed=0, num_inference_steps=20)
    edited = gen.img2img("a green circle on a blue background", init_image="in.png", strength=0.6, seed=0)

    from ldm_pipeline import init_model, load_pipeline
    init_model("tiny", "tiny-model", seed=0)           # random-initialised model folder from configs/models
    pipe, info = load_pipeline("tiny-model")          # a diffusers StableDiffusionPipeline
"""

__version__ = "0.1.0"

__all__ = ["Generator", "RuntimeOptions", "Job", "init_model", "load_pipeline", "UserError", "__version__"]


def __getattr__(name: str):
    if name in ("Generator", "RuntimeOptions", "Job"):
        from ldm_pipeline import pipeline

        return getattr(pipeline, name)
    if name in ("init_model", "load_pipeline"):
        from ldm_pipeline import models

        return getattr(models, name)
    if name == "UserError":
        from ldm_pipeline.errors import UserError

        return UserError
    raise AttributeError(f"module 'ldm_pipeline' has no attribute {name!r}")
