"""Atomic writes (files and whole folders) that end up with ordinary permissions: the one place every output of
the package (images aside, which never overwrite) goes through.

``tempfile.mkdtemp``/``mkstemp`` create 0700 folders and 0600 files (private on purpose); renamed into place they
would stay unreadable to another user's A1111/ComfyUI or a shared models folder. These give them the modes a plain
``mkdir``/``open`` would under the user's umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("LDM_PIPELINE_CACHE", Path.home() / ".cache" / "ldm_pipeline"))  # derived files


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


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = True):
    """Write a file under a unique temporary name beside `path` (yielded, for any library's ``save(path)``) and,
    when the block ends without an error, flush it to disk, give it ordinary modes and rename it over `path`, so a
    reader sees the old file or the new one, never half of one. With ``overwrite=False`` an existing `path` is a
    FileExistsError (also when it appeared while writing). Removed on an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        ordinary_modes(tmp)  # a library may have written through a private temporary of its own
        if path.exists() and not overwrite:
            raise FileExistsError(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False):
    """Build a folder under a unique temporary name beside `final` and rename it into place when the block ends
    without an error (left behind on an error: removed). An existing `final` is an error unless `overwrite`, and is
    then replaced only once the new folder is complete. Yields the temporary folder to write into."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    tmp = make_temp_dir(final.parent, prefix=f".{final.name}.tmp-")
    try:
        yield tmp
        ordinary_modes(tmp)  # libraries' savers write private 0600 files
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = make_temp_dir(final.parent, prefix=f".{final.name}.old-")
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
