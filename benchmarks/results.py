"""Results files of the benchmarks: every figure shown in README.md or docs/ comes from one of these.

Each benchmark calls `start()` before it measures and `save()` after, which writes
``benchmarks/results/<kind>-<YYYYMMDD-HHMMSS>.json`` (atomically: a temporary file renamed into place, never
over an existing file) and prints its path. A file holds:

  benchmark   the kind (generate, train, startup): which table of `report.py` it belongs to
  command     the command line, as typed from the repository root; argv: the same as a list
  date        UTC ISO time the run started; finished: when it ended; duration_s
  machine     CPU model, logical/usable core counts, RAM, OS, load average at start and end (the CPU may be shared)
  device      what ran the models: {"type": "cpu", "name": CPU model, "torch_threads": N} or the CUDA GPU's name
  versions    python, torch (and its CUDA), diffusers, transformers, accelerate, ldm_pipeline
  git         commit of the working tree and whether it had uncommitted changes
  settings    the benchmark's own settings (model, size, steps, batch, repeats, ...)
  raw         every measured repeat, not only medians (seconds, or samples and seconds)
  derived     medians, minima and ratios computed from raw (what report.py shows)

Standard library only at import time, so report.py and --help stay instant.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = 1
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "ldm_pipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--results-dir and --no-save, the same in every benchmark."""
    g = parser.add_argument_group("results file")
    g.add_argument("--results-dir", default=str(RESULTS_DIR),
                   help="where to write <kind>-<YYYYMMDD-HHMMSS>.json (default: benchmarks/results)")
    g.add_argument("--no-save", action="store_true", help="dry run: print the table, write no results file")


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def iso(t: _dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def start() -> dict[str, Any]:
    """What a run records before it measures: its start time, command line and the load on the machine."""
    return {"started": utc_now(), "loadavg_start": _loadavg(), "argv": list(sys.argv)}


def command_line(argv: list[str]) -> str:
    """`python benchmarks/bench_x.py ARGS`, the script named relative to the repository root when inside it."""
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *argv[1:]])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def machine() -> dict[str, Any]:
    ram = ram_bytes()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),  # logical CPUs of the machine
        "cores_usable": usable,  # those this process may run on (affinity / container limits)
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
    }


def device_info(device: str) -> dict[str, Any]:
    """The device the models ran on: "cpu", "cuda", "cuda:1", "mps"."""
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        return {"type": "cuda", "name": torch.cuda.get_device_name(idx), "index": idx,
                "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    if device.startswith("mps"):
        return {"type": "mps", "name": f"Apple MPS ({cpu_model()})"}
    return {"type": "cpu", "name": cpu_model(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def git_state() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def record(kind: str, begun: dict[str, Any], *, device: str, settings: dict[str, Any], raw: dict[str, Any],
           derived: dict[str, Any]) -> dict[str, Any]:
    """The whole results record of one run (see the module docstring)."""
    finished = utc_now()
    mach = machine()
    mach["loadavg_start"] = begun["loadavg_start"]
    mach["loadavg_end"] = _loadavg()
    return {
        "schema": SCHEMA,
        "benchmark": kind,
        "command": command_line(begun["argv"]),
        "argv": begun["argv"],
        "date": iso(begun["started"]),
        "finished": iso(finished),
        "duration_s": round((finished - begun["started"]).total_seconds(), 1),
        "machine": mach,
        "device": device_info(device),
        "versions": versions(),
        "git": git_state(),
        "settings": settings,
        "raw": raw,
        "derived": derived,
    }


def write(rec: dict[str, Any], results_dir: str | Path) -> Path:
    """Write `rec` as ``<results_dir>/<kind>-<YYYYMMDD-HHMMSS>.json`` atomically (never replacing a file: a second
    run in the same second gets ``-2``), mode 0666 & ~umask; return the path."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.fromisoformat(rec["date"].replace("Z", "+00:00")).strftime("%Y%m%d-%H%M%S")
    data = (json.dumps(rec, indent=2, allow_nan=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for n in range(1, 1000):
            final = folder / (f"{rec['benchmark']}-{stamp}" + (f"-{n}" if n > 1 else "") + ".json")
            try:
                os.link(tmp, final)  # atomic, and fails rather than replace an existing file
            except FileExistsError:
                continue
            except OSError:  # no hard links here: rename (atomic; the exists check is best effort)
                if final.exists():
                    continue
                os.replace(tmp, final)
            return final
        raise FileExistsError(f"no free results file name for {rec['benchmark']}-{stamp} in {folder}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(kind: str, begun: dict[str, Any], args: argparse.Namespace, **fields: Any) -> Path | None:
    """Build the record and write it under --results-dir (unless --no-save); print and return its path."""
    rec = record(kind, begun, **fields)
    if args.no_save:
        print("--no-save: no results file written")
        return None
    path = write(rec, args.results_dir)
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"results: {shown}")
    return path

