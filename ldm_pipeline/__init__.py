"""ldm_pipeline: latent text-to-image diffusion on the Hugging Face stack.

Python API (heavy libraries are imported on first use, so ``import ldm_pipeline`` is instant)::

    from ldm_pipeline import ImageGenerator, RuntimeOptions
    gen = ImageGenerator.load("shapes", RuntimeOptions(device="auto", dtype="fp32"))   # or a folder / file
    images = gen.txt2img("a red circle on a blue background", seed=0, num_inference_steps=20)
    images[0].save("circle.png")
    edited = gen.img2img("a green circle on a blue background", init_image="circle.png", strength=0.6, seed=0)

    from ldm_pipeline import replay_image
    again = replay_image("outputs/txt2img/00000-0.png")       # an image made again from its PNG record

    from ldm_pipeline import init_model, load_pipeline
    init_model("tiny", "tiny-model", seed=0)           # random-initialised model folder from configs/models
    pipe, info = load_pipeline("tiny-model")          # a diffusers StableDiffusionPipeline
"""

__version__ = "0.1.0"

__all__ = ["ImageGenerator", "Generator", "RuntimeOptions", "Job", "replay_image", "init_model", "load_pipeline",
           "UserError", "__version__"]

_HOME = {"ImageGenerator": "generator", "Generator": "generator", "RuntimeOptions": "settings", "Job": "settings",
         "replay_image": "generator", "init_model": "models", "load_pipeline": "models", "UserError": "errors"}


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"ldm_pipeline.{_HOME[name]}"), name)
    raise AttributeError(f"module 'ldm_pipeline' has no attribute {name!r}")
