"""Splitting generation across processes started by ``torchrun`` or ``accelerate launch``.

accelerate's ``PartialState.split_between_processes`` hands each rank a contiguous slice of the jobs; every rank
computes the same starting file number before any rank writes (a barrier between listing and writing), and each
image's number is its job index, so every image is written exactly once and equals the single-process result for
its prompt and seed. A random base seed is drawn once, on rank 0, and broadcast, so image i has seed base + i
whichever rank makes it. Every collective (barriers, the seed broadcast, the grid gather) is entered by every
rank, including ranks that were handed no jobs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_state(options):
    """accelerate's PartialState when launched as several processes (None for one); with ``--device auto`` and a
    GPU per rank, each rank's device becomes its own GPU."""
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    # without a GPU per rank, torchrun's ranks are CPU (gloo) processes
    state = PartialState(cpu=options.device == "cpu" or not _cuda())
    if options.device == "auto" and state.device.type == "cuda":
        options.device = str(state.device)
    return state


def shared_random_seed(state) -> int:
    """A random seed that is the same on every rank: rank 0 draws it and broadcasts it."""
    from ldm_pipeline.settings import random_seed

    if state is None:
        return random_seed()
    from accelerate.utils import broadcast_object_list

    box = [random_seed() if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def split_jobs(jobs: list, outdir: Path, state):
    """Yields (this process's jobs, first file number); all jobs and `next_number` when `state` is None."""
    from ldm_pipeline.outputs import next_number

    if state is None:
        yield jobs, next_number(outdir)
        return
    start = next_number(outdir)
    state.wait_for_everyone()  # everyone has listed outdir before anyone writes
    with state.split_between_processes(jobs) as mine:
        yield mine, start
    state.wait_for_everyone()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gather_grid_images(saved: list, state):
    """All ranks' images in job order on the main process (None elsewhere); single-process: this process's.
    Under several processes every rank must call this, with or without images of its own (it is a collective)."""
    if state is None:
        return [im for _, _, im in sorted(saved, key=lambda t: t[0])]
    from accelerate.utils import gather_object

    paths = gather_object([(i, str(p)) for i, p, _ in saved])
    if not state.is_main_process:
        return None
    from PIL import Image

    return [Image.open(p).convert("RGB") for _, p in sorted(paths)]
