"""Optional dependencies (pyproject's extras): one place that says which ``pip install`` brings each one, so a
missing extra is a one-line error naming the command to run, not an ImportError traceback."""

from __future__ import annotations

from ldm_pipeline.errors import UserError

# importable module → the extra that installs it
EXTRA_OF: dict[str, str] = {
    "peft": "train",
    "webdataset": "train",
    "braceexpand": "train",  # webdataset's shard-list expansion
    "pyarrow": "train",
    "fsspec": "train",
    "tokenizers": "train",
    "tensorboard": "train",
}


def install_hint(module: str) -> str:
    extra = EXTRA_OF.get(module.split(".")[0])
    return f"pip install 'ldm_pipeline[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def missing(feature_modules: tuple[str, ...]) -> list[str]:
    """The modules of `feature_modules` that cannot be imported here (without importing the rest twice)."""
    import importlib.util

    return [m for m in feature_modules if importlib.util.find_spec(m) is None]


def require_all(modules: tuple[str, ...], feature: str) -> None:
    """Check up front, before any work or output, that every module `feature` needs is importable."""
    if gone := missing(modules):
        raise UserError(f"{feature} needs the '{gone[0]}' package, which is not installed: run {install_hint(gone[0])}")
