"""Splitting generation across processes started by ``torchrun`` or ``accelerate launch``.

accelerate's ``PartialState.split_between_processes`` hands each rank a contiguous slice of the jobs; every rank
computes the same starting file number before any rank writes (a barrier between listing and writing), and each
image's number is its job index, so every image is written exactly once and equals the single-process result for
its prompt and seed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def split_jobs(jobs: list, outdir: Path, options):
    """Yields (this process's jobs, first file number, PartialState or None when single-process)."""
    from ldm_pipeline.pipeline import next_number

    if world_size() <= 1:
        yield jobs, next_number(outdir), None
        return
    from accelerate import PartialState

    # without a GPU per rank, torchrun's ranks are CPU (gloo) processes
    state = PartialState(cpu=options.device == "cpu" or not _cuda())
    if options.device == "auto" and state.device.type == "cuda":
        options.device = str(state.device)
    start = next_number(outdir)
    state.wait_for_everyone()  # everyone has listed outdir before anyone writes
    with state.split_between_processes(jobs) as mine:
        yield mine, start, state
    state.wait_for_everyone()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gather_grid_images(saved: list, state):
    """All ranks' images in job order on the main process (None elsewhere); single-process: this process's."""
    if state is None:
        return [im for _, _, im in sorted(saved, key=lambda t: t[0])]
    from accelerate.utils import gather_object

    paths = gather_object([(i, str(p)) for i, p, _ in saved])
    if not state.is_main_process:
        return None
    from PIL import Image

    return [Image.open(p).convert("RGB") for _, p in sorted(paths)]
