"""Temporary names for atomic writes that end up with ordinary permissions.

``tempfile.mkdtemp``/``mkstemp`` create 0700 folders and 0600 files (private on purpose); renamed into place they
would stay unreadable to another user's A1111/ComfyUI or a shared models folder. These give them the modes a plain
``mkdir``/``open`` would under the user's umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` (created if missing), mode 0777 & ~umask like ``mkdir``."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def make_temp_file(parent: str | Path, prefix: str) -> tuple[int, Path]:
    """(fd, path) of a new uniquely named file in `parent`, mode 0666 & ~umask like ``open(..., 'w')``."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, Path(name)


def ordinary_modes(root: str | Path) -> None:
    """Give `root` and everything under it the modes mkdir/open would under the umask. Libraries' own savers
    (transformers' ``save_pretrained`` writes its safetensors through a private 0600 temporary) leave files that
    only their owner can read."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
