"""Checkpoint directories ``OUTPUT_DIR/checkpoint-STEP`` (diffusers' naming), written atomically.

A checkpoint is assembled in ``OUTPUT_DIR/.checkpoint-STEP.tmp`` by every rank (accelerate's ``save_state``: model,
optimizer, grad scaler, registered objects, each rank's RNG states; plus each rank's part of the `TrainState` in
``rank_states/``), fsynced, then renamed into place by the main process. `ldm train-vae` (one process, no
accelerate) writes its checkpoints, and checks its output dir, with the same functions. A run killed at any moment
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
    from ldm_pipeline.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))


def encode_bytes(t) -> str:
    """A uint8 tensor (a torch.Generator state) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(text: str):
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def save_checkpoint(output_dir: Path, step: int, write_main: Callable[[Path], None], total_limit: int | None,
                    accelerator=None, rank_state: dict[str, Any] | None = None) -> Path:
    """``OUTPUT_DIR/checkpoint-STEP``, published whole by a rename. With an `accelerator` this is collective (every
    rank calls it): accelerate's ``save_state`` and this rank's `rank_state` JSON go in first. `write_main(tmp_dir)`
    then writes the main process's part (config, pipeline folder, and ``training_state.json`` last)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"  # one name every rank knows (a unique temp name would not be)
    main = accelerator is None or accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        write_json(tmp / "rank_states" / f"rank{accelerator.process_index}.json", rank_state)
        accelerator.wait_for_everyone()  # all ranks' files are in before the main process publishes
    if main:
        write_main(tmp)
        _publish(tmp, final)
        prune(output_dir, total_limit, protect=final)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, then rename it to `final` (an existing `final`, a step re-saved after resuming from an older
    checkpoint, is swapped out first)."""
    from ldm_pipeline.files import ordinary_modes

    ordinary_modes(tmp)
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def prepare_output_dir(output_dir: str | Path, resume: str | None, overwrite: bool, rank: int = 0,
                       is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path | None:
    """Check `output_dir` and return the checkpoint to resume from (None: a fresh start). Every rank checks (so
    all raise together) before the main process touches anything: a non-empty folder needs `resume` or `overwrite`
    (which empties it); half-written checkpoints of a killed run are removed."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output dir {out}: {e.strerror or e}") from None
    checkpoint = resolve_resume(out, resume)
    entries = [p for p in out.iterdir() if not p.name.startswith(".write-test-")]
    if entries and resume is None and not overwrite:
        raise UserError(f"output dir {out} is not empty: pass --resume latest to continue that run, "
                        "--overwrite to start over (deletes its contents), or another --output-dir")
    barrier()
    if is_main:
        if overwrite and resume is None:
            for p in entries:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        remove_stale_tmp(out)
    barrier()
    return checkpoint


# Fields that may differ between a checkpoint's config and the run resuming from it: how long and how often, where
# to, what to show (the model and caching are checked on their own). Anything else changes what is trained, and needs allow_resume_changes.
RESUME_MAY_CHANGE = ("model", "cache_latents", "max_steps", "checkpoint_every", "checkpoints_total_limit", "checkpoint_pipeline",
                     "validate_every", "validation.", "report_to", "log_every", "progress_bar", "output_dir",
                     "resume", "overwrite", "cache_dir", "cache_batch_size", "allow_resume_changes", "eval_every",
                     "num_eval_images", "eval_batch_size", "num_grid_images", "device", "num_threads", "deterministic")


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each training-relevant field (dotted) that differs between two config dicts."""
    from ldm_pipeline.config import flatten

    old, new = flatten(saved), flatten(now)
    changed = []
    for key in sorted(old.keys() & new.keys()):  # a field added or retired since is no change of this run's
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_MAY_CHANGE):
            continue
        if old[key] != new[key]:
            changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changed


def check_resume(checkpoint: Path, config_file: str, config: dict[str, Any], model_hash: str | None = None,
                 cache_latents: bool | None = None) -> None:
    """Refuse (one UserError line) to continue `checkpoint` with another model, another latent-caching mode or a
    changed training config; the caller skips this when allow_resume_changes is set."""
    from ldm_pipeline.config import load_yaml

    hint = " (pass --allow-resume-changes to continue anyway)"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved_hash = state.get("model_hash")
    if model_hash is not None and saved_hash and saved_hash != model_hash:
        raise UserError(f"cannot resume {checkpoint}: it was trained from model {state.get('model')} (hash "
                        f"{saved_hash}), --model is a different one (hash {model_hash}){hint}")
    if cache_latents is not None:
        saved_cached = state.get("cache_latents")
        if saved_cached is None:  # older checkpoints: the latent cache's position is {"epoch", "index"}
            data = read_rank_state(checkpoint, 0, int(state.get("world_size", 1))).get("data") or {}
            saved_cached = "index" in data
        if bool(saved_cached) != cache_latents:
            raise UserError(f"cannot resume {checkpoint}: it was trained with cache_latents={bool(saved_cached)}, "
                            f"this run has cache_latents={cache_latents} (its data position would not apply){hint}")
    if (checkpoint / config_file).is_file():
        changed = config_changes(load_yaml(checkpoint / config_file), config)
        if changed:
            raise UserError(f"cannot resume {checkpoint}: training config changed: {'; '.join(changed)}{hint}")


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
