"""Classifier-free guidance control inside diffusers' denoising loop, through its ``callback_on_step_end`` hook:
the guidance cut-off (no CFG at low noise), and chaining several callbacks into the one diffusers takes."""

from __future__ import annotations


def guidance_cutoff_callback(threshold: float):
    """A ``callback_on_step_end`` that switches classifier-free guidance off for the steps at timesteps below
    `threshold`: those steps run the conditional pass alone (and the negative prompt no longer applies), as in
    A1111's "negative guidance minimum sigma" and Kynkäänniemi et al. 2024's guidance interval. Strong guidance
    decides colour and layout at high noise; at low noise it over-sharpens outlines (squares come out pinched).
    The step that the callback ends decides the next one; the caller handles a first step below the threshold."""

    # our own: diffusers' SDCFGCutoffCallback counts steps (an img2img run, which starts part-way, would switch at
    # another noise level) and keeps only the last prompt's embedding of a batch
    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        run = pipe.scheduler.timesteps[-pipe.num_timesteps:]  # the steps this call runs (img2img: the tail)
        if pipe.do_classifier_free_guidance and i + 1 < len(run) and run[i + 1] < threshold:
            for name in CFG_TENSORS:  # [negative; positive] → positive
                if name in kwargs:
                    kwargs[name] = kwargs[name].chunk(2)[1]
            pipe._guidance_scale = 1.0
        return kwargs

    return callback


CFG_TENSORS = ("prompt_embeds", "add_text_embeds", "add_time_ids")  # batched [negative; positive] (the last two: SDXL)


def chain_callbacks(callbacks: list):
    """Several ``callback_on_step_end`` functions as one (diffusers takes a single callable)."""

    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        for cb in callbacks:
            kwargs = cb(pipe, i, t, kwargs)
        return kwargs

    return callback
