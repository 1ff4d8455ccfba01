"""ldm doctor: what this installation is made of, for bug reports.

  ldm doctor

Prints the versions of Python and of the libraries ldm_pipeline runs on, the devices torch sees, where the shipped
model is, and the settings that change where models come from. It checks each library against the versions
ldm_pipeline declares it needs (its own package metadata) and against combinations known not to work together,
and exits 1 when it found a problem (0 otherwise).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata

from ldm_pipeline.cli.common import Parser, run_main

LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
             "peft", "webdataset", "pyarrow", "numpy", "pillow")


def build_parser(prog: str = "ldm doctor") -> argparse.ArgumentParser:
    return Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def requirement_problems() -> list[str]:
    """Installed libraries outside the ranges ldm_pipeline declares (pyproject's dependencies and extras)."""
    from packaging.requirements import Requirement

    problems = []
    for text in metadata.requires("ldm_pipeline") or []:
        req = Requirement(text)
        extra = None
        if req.marker is not None:
            if not req.marker.evaluate({"extra": "train"}):
                continue  # dev tools, or another platform's: not the user's concern here
            extra = "train"
        version = installed(req.name)
        if version is None:
            if extra is None:
                problems.append(f"{req.name} is not installed: ldm_pipeline needs {req}")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            where = f" (the [{extra}] extra)" if extra else ""
            problems.append(f"{req.name} {version} is outside what ldm_pipeline needs{where}: {req.name}{req.specifier}")
    return problems


def combination_problems() -> list[str]:
    """Pairs of libraries that install together but fail at run time."""
    problems = []
    peft = installed("peft")
    try:  # transformers' own floor for peft: text-encoder LoRA goes through its PEFT integration
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        MIN_PEFT_VERSION = None
    if peft and MIN_PEFT_VERSION:
        from packaging.version import Version

        if Version(peft) < Version(MIN_PEFT_VERSION):
            problems.append(f"transformers {installed('transformers')} needs peft >= {MIN_PEFT_VERSION} for "
                            f"text-encoder LoRA, but peft {peft} is installed: pip install -c constraints.txt "
                            "'ldm_pipeline[train]' (or a transformers that accepts this peft)")
    return problems


def device_lines() -> list[str]:
    import torch

    lines = [f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}, "
                         f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
        lines.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        lines.append(f"cuda: none{' (this torch is a CPU build)' if torch.version.cuda is None else ''}")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"mps: {'available' if mps is not None and mps.is_available() else 'none'}")
    return lines


def run(args: argparse.Namespace) -> int:
    from ldm_pipeline import __version__
    from ldm_pipeline.files import CACHE_DIR
    from ldm_pipeline.models import SHIPPED_MODELS, default_model

    out = [f"ldm_pipeline {__version__} ({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})",
           f"python {platform.python_version()} on {platform.platform()}", "", "libraries:"]
    for lib in LIBRARIES:
        out.append(f"  {lib:16} {installed(lib) or 'not installed'}")
    out += ["", "devices:", *(f"  {line}" for line in device_lines()), "", "models:"]
    for name, folder in SHIPPED_MODELS.items():
        state = "present" if (folder / "model_index.json").is_file() else "MISSING"
        out.append(f"  shipped '{name}': {folder} ({state})")
    out.append(f"  default --model: {default_model() or 'none'}")
    for var in ("LDM_MODEL", "HF_HUB_OFFLINE", "HF_HOME", "LDM_PIPELINE_CACHE"):
        if os.environ.get(var):
            out.append(f"  ${var} = {os.environ[var]}")
    out.append(f"  cache: {CACHE_DIR}")
    problems = requirement_problems() + combination_problems()
    out += ["", f"problems: {len(problems) or 'none'}", *(f"  warning: {p}" for p in problems)]
    print("\n".join(out))
    return 1 if problems else 0


def main(argv: list[str] | None = None, prog: str = "ldm doctor") -> int:
    return run_main(run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
