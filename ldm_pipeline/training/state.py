"""`TrainState`: everything of a run that outlives one optimizer step and is not a model, optimizer or LR schedule
(those are accelerate's ``save_state``). Saved and restored as one unit with every checkpoint: the shared part in
``training_state.json``, each rank's own part (data position, noise generator) in ``rank_states/rankN.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_pipeline.training import checkpoints as ckpt


@dataclass
class TrainState:
    global_step: int = 0  # optimizer steps done (a skipped step is not one)
    samples_seen: int = 0  # over all processes
    bad_steps: int = 0  # optimizer steps skipped for a NaN/inf loss, in total
    bad_in_a_row: int = 0  # ... in a row, up to now (max_bad_steps stops the run)
    scaler_skips: int = 0  # fp16: steps the grad scaler skipped (inf/NaN gradients); not counted as steps
    data_epoch: int = 0  # data epochs every rank has finished (and that were reported)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over ranks)
    train_seconds: float = 0.0  # wall time of the optimizer steps in this session (not saved)
    # this rank's: its data stream's position (a LoaderState dict, or the latent cache's {"epoch", "index"}) and the
    # generator of noise, timesteps and latent samples
    data: dict[str, Any] | None = None
    noise_generator: Any = None  # torch.Generator

    def shared_dict(self, world_size: int, extra: dict[str, Any]) -> dict[str, Any]:
        """training_state.json: the same on every rank (written by the main process)."""
        return {"global_step": self.global_step, "samples_seen": self.samples_seen, "bad_steps": self.bad_steps,
                "bad_in_a_row": self.bad_in_a_row, "scaler_skips": self.scaler_skips, "data_epoch": self.data_epoch,
                "world_size": world_size, "losses": self.losses, **extra}

    def rank_dict(self) -> dict[str, Any]:
        return {"data": self.data, "noise_generator": ckpt.encode_bytes(self.noise_generator.get_state())}

    def load(self, checkpoint: Path, rank: int, world_size: int) -> None:
        """Restore from a checkpoint in place (the live generator gets the saved state)."""
        mine = ckpt.read_rank_state(checkpoint, rank, world_size)  # checks the world size first
        shared = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
        self.global_step, self.samples_seen = int(shared["global_step"]), int(shared["samples_seen"])
        self.bad_steps, self.bad_in_a_row = int(shared["bad_steps"]), int(shared.get("bad_in_a_row", 0))
        self.scaler_skips, self.data_epoch = int(shared.get("scaler_skips", 0)), int(shared.get("data_epoch", 0))
        self.losses = [(int(s), float(v)) for s, v in shared["losses"]]
        self.data = mine["data"]
        self.noise_generator.set_state(ckpt.decode_bytes(mine["noise_generator"]))

    def mean_recent_loss(self, n: int = 10) -> float | None:
        recent = [v for _, v in self.losses[-n:]]
        return sum(recent) / len(recent) if recent else None
