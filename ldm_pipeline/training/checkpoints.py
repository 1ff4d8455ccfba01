"""Checkpoint directories ``OUTPUT_DIR/checkpoint-STEP`` (diffusers' naming), written atomically.

A checkpoint is assembled in ``OUTPUT_DIR/.checkpoint-STEP.tmp`` by every rank (accelerate's ``save_state``: model,
optimizer, grad scaler, registered objects, each rank's RNG states; plus each rank's data position and noise
generator in ``rank_states/``), fsynced, then renamed into place by the main process. A run killed at any moment
leaves either a complete ``checkpoint-STEP`` or a ``.tmp`` that `latest_checkpoint` never picks (and the next save
deletes). The output directory must be shared by all ranks (as for diffusers' scripts).

Resuming from step S makes the checkpoints after S an abandoned future: `set_aside_future` renames them
``checkpoint-N.abandoned-TIME`` (kept, never picked by ``--resume latest`` nor counted by the total limit), so the
run that continues from S neither mixes with them nor has its new checkpoints pruned in their favour.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError

STATE_FILE = "training_state.json"  # step counters, loss history: written last into the .tmp dir
CONFIG_FILE = "train_config.yaml"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1][1] if dirs else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``latest`` → newest checkpoint (None when there is none yet: a fresh start); a path → that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume} is not a complete checkpoint folder (no {STATE_FILE})")
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((checkpoint / STATE_FILE).read_text())["global_step"])


def set_aside_future(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints after `step` to ``checkpoint-N.abandoned-TIME`` (main process, when resuming from
    `step`); returns their new paths."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for n, p in checkpoint_dirs(output_dir):
        if n > step:
            target = p.with_name(f"{p.name}.abandoned-{stamp}")
            os.rename(p, target)
            moved.append(target)
    if moved:
        _fsync_dir(Path(output_dir))
    return moved


def prune(output_dir: str | Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never `protect` (the one just written); returns the deleted."""
    if keep is None:
        return []
    dirs = [p for _, p in checkpoint_dirs(output_dir)]
    if protect is not None and Path(protect).resolve() in [p.resolve() for p in dirs]:
        dirs = [p for p in dirs if p.resolve() != Path(protect).resolve()]
        keep -= 1  # the protected one is kept and counts
    gone = dirs[: max(0, len(dirs) - keep)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def remove_stale_tmp(output_dir: str | Path) -> None:
    """Delete half-written ``.checkpoint-*.tmp`` dirs left by a killed run."""
    out = Path(output_dir)
    if out.is_dir():
        for p in out.glob(".checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` so the rename that follows publishes complete data."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def encode_bytes(t) -> str:
    """A uint8 tensor (a torch.Generator state) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(text: str):
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def save_checkpoint(accelerator, output_dir: Path, step: int, rank_state: dict[str, Any],
                    write_main: Callable[[Path], None], total_limit: int | None) -> Path:
    """Collective: every rank calls it. Returns ``OUTPUT_DIR/checkpoint-STEP``.

    `rank_state` is this rank's JSON (data position, noise generator); `write_main(tmp_dir)` writes the main
    process's extras (config, pipeline folder, training_state.json).
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    write_json(tmp / "rank_states" / f"rank{accelerator.process_index}.json", rank_state)
    accelerator.wait_for_everyone()  # all ranks' files are in before the main process publishes
    if accelerator.is_main_process:
        write_main(tmp)
        fsync_tree(tmp)
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap the old one out first
            old = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(output_dir)
        prune(output_dir, total_limit, protect=final)
    accelerator.wait_for_everyone()
    return final


def read_rank_state(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's saved JSON; a clear error when the checkpoint came from a different number of processes."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise UserError(f"checkpoint {checkpoint} was written by {saved_world} processes, this run has {world_size}: "
                        "resume with the same number of processes")
    path = checkpoint / "rank_states" / f"rank{rank}.json"
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} lacks {path.name}: it is incomplete")
    return json.loads(path.read_text())
