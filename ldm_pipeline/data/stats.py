"""`DataStats`: how many samples were seen, used, skipped (and why), and what was fixed on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataStats:
    """Counters for one worker, rank or run; `merge` adds another's, `summary` is one log line."""

    seen: int = 0  # raw samples read (before filters)
    used: int = 0  # samples that went into a batch
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (no_caption, corrupt_image, ...)
    events: dict[str, int] = field(default_factory=dict)  # handled without skipping (upscaled, truncated_shard, ...)

    def skip(self, reason: str) -> None:
        """Count one skipped sample."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def note(self, event: str, count: int = 1) -> None:
        """Count something that was fixed or noticed without dropping a sample."""
        if count:
            self.events[event] = self.events.get(event, 0) + count

    def merge(self, other: DataStats) -> DataStats:
        """A new DataStats holding the sum of both (workers and ranks merge into one)."""
        out = DataStats(self.seen + other.seen, self.used + other.used, dict(self.skipped), dict(self.events))
        for k, v in other.skipped.items():
            out.skipped[k] = out.skipped.get(k, 0) + v
        for k, v in other.events.items():
            out.events[k] = out.events.get(k, 0) + v
        return out

    def summary(self) -> str:
        """One line: ``seen 100, used 95, skipped 5 (corrupt_image 2, no_caption 3), upscaled 4``."""
        line = f"seen {self.seen}, used {self.used}, skipped {sum(self.skipped.values())}"
        if self.skipped:
            line += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.events:
            line += ", " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items()))
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"seen": self.seen, "used": self.used, "skipped": dict(self.skipped), "events": dict(self.events)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataStats:
        """Inverse of `to_dict`."""
        return cls(int(data.get("seen", 0)), int(data.get("used", 0)), dict(data.get("skipped", {})),
                   dict(data.get("events", {})))


def merge_stat_dicts(items: list[dict]) -> dict[str, Any]:
    """Several ranks' `DataStats.to_dict()` (gathered; an empty one from a rank with none) as one."""
    total = DataStats()
    for d in items:
        if d:
            total = total.merge(DataStats.from_dict(d))
    return total.to_dict()


def summarize(stats: dict[str, Any]) -> str:
    """`DataStats.summary()` of a stats dict."""
    return DataStats.from_dict(stats).summary()
