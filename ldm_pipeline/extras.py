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


def check_packages(need: dict[str, str], what: str) -> None:
    """Raise one UserError naming every module of `need` (module → what needs it) that is not installed, and the
    pip install(s) to run; called before any work or output."""
    absent = missing(tuple(need))
    if not absent:
        return
    listed = ", ".join(f"{m} (for {need[m]})" for m in absent)
    hints = " and ".join(dict.fromkeys(install_hint(m) for m in absent))
    one = len(absent) == 1
    raise UserError(f"{what} needs {'a package' if one else 'packages'} that {'is' if one else 'are'} not installed: "
                    f"{listed}; run {hints}")
