"""Content hashes: of files (cached for multi-GB checkpoints, as A1111 does), of model folders, of a hub model's
local snapshot, and A1111's AutoV3 hash of a LoRA file. Model hashes go into A1111's ``Model hash``; they also tell
replay and resume whether a model is the one recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ldm_pipeline.files import CACHE_DIR, atomic_write_text


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, cached by (path, size, mtime) so multi-GB checkpoints are hashed once (as A1111 does)."""
    path = Path(path).resolve()
    st = path.stat()
    cache_file = CACHE_DIR / "hashes.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if st.st_size > 64 << 20:  # only worth caching for big files
        cache[key] = digest
        try:
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass
    return digest


def folder_hash(folder: str | Path) -> str:
    """Content hash of a diffusers folder: sha256 over its weight files' hashes and configs, in a fixed order."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json", ".txt")) and not p.name.startswith("."):
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def hub_snapshot_hash(model_id: str) -> str | None:
    """Content hash of a hub model's local snapshot (the files from_pretrained loaded), or None when there is no
    local copy to hash."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached, or a cache laid out otherwise: no hash rather than a made-up one
        return None
    return folder_hash(folder)[:10]


def safetensors_autov3(path: Path) -> str:
    """A1111's LoRA hash ("AutoV3", kohya's addnet hash): sha256 of a .safetensors file after its JSON header, so
    editing the metadata does not change it."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
