"""The names that lived here before generation was split along its seams, for scripts that import them: settings
(`ldm_pipeline.settings`), the generator (`ldm_pipeline.generator`), init images (`ldm_pipeline.images`), outputs
(`ldm_pipeline.outputs`) and replay (`ldm_pipeline.replay`). New code imports from those modules."""

from ldm_pipeline.generator import (  # noqa: F401
    Generator,
    ImageGenerator,
    NonFiniteImageError,
    Result,
    check_finite,
    guidance_cutoff_callback,
    load_lora,
)
from ldm_pipeline.images import check_image_readable, expand_image_paths, fit_image, load_init_image, to_rgb  # noqa: F401
from ldm_pipeline.outputs import check_outdir, next_number, save_png  # noqa: F401
from ldm_pipeline.replay import lora_record, safetensors_autov3  # noqa: F401
from ldm_pipeline.settings import *  # noqa: F401,F403
from ldm_pipeline.settings import jobs_from_api as _jobs_from_api  # noqa: F401
