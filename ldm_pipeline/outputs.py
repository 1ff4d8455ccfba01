"""Images going out: numbered PNG files written atomically that never overwrite, with their metadata; the output
folder's checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ldm_pipeline.errors import UserError


def next_number(outdir: Path) -> int:
    """1 + the highest NNNNN prefix of files in `outdir` (so numbering continues after existing images)."""
    best = -1
    if outdir.is_dir():
        for p in outdir.iterdir():
            head = p.name.split("-", 1)[0].split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


def save_png(image, path: Path, record: dict[str, Any] | None = None) -> Path:
    """Write atomically and never overwrite: a temporary file, then a hard link to a free name (the next number
    up if `path` was taken meanwhile). Where the filesystem has no hard links (FAT, some network and FUSE
    mounts), the free name is claimed with an exclusive create and the finished file renamed over it. Returns
    the final path; a failed write (disk full, permissions) is a UserError naming the path."""
    from ldm_pipeline.files import make_temp_file
    from ldm_pipeline.metadata import png_info

    final = path
    tmp = None
    try:
        fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.tmp-")
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(record) if record else None)
        use_link = True
        while True:
            try:
                if use_link:
                    os.link(tmp, final)
                else:
                    os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # claim the name
                    try:
                        os.replace(tmp, final)
                    except OSError:
                        final.unlink(missing_ok=True)
                        raise
                break
            except FileExistsError:
                final = _bump(final)
            except OSError:
                if not use_link:
                    raise
                use_link = False  # no hard links here: claim-and-rename instead
    except OSError as e:
        raise UserError(f"cannot write {final}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return final


def _bump(path: Path) -> Path:
    head, _, tail = path.name.partition("-")
    if head.isdigit():
        return path.with_name(f"{int(head) + 1:0{len(head)}d}-{tail}")
    return path.with_name(f"{path.stem}-1{path.suffix}")


def check_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {outdir}: {e.strerror}; choose another --outdir") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise UserError(f"output folder {outdir} is not writable: choose another --outdir")


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr)
