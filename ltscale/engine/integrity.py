"""Checkpoint integrity: the completion marker (``ltscale_meta.json``) and the checksums in it.

Why a manifest: atomic renames protect against a crash during a save, not against a file damaged
later (a truncated copy, a bad disk, a half-synced object store). The size and sha256 of every
file of a checkpoint go into its meta file, which is written after all of them (so its presence
also means "complete"), and are verified before DeepSpeed reads anything (DeepSpeed unpickles its
own files, so this also keeps a swapped file from reaching ``torch.load``). Hashing is split over
ranks by the rank number in the file name, so each rank hashes the shards it wrote or will read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["META_FILE", "CheckpointCorruptError", "hash_share", "read_meta", "verify_checkpoint"]

META_FILE = "ltscale_meta.json"
HASH_CHUNK = 1 << 22
_RANK_IN_NAME = re.compile(r"rank_?(\d+)")


def read_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    meta = ckpt_dir / META_FILE
    if meta.is_symlink() or not meta.is_file():
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", meta, e)
        return None
    return data if isinstance(data, dict) else None


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file is missing, truncated or altered; the message names every such file."""

    def __init__(self, path: Path, problems: list[str], hint: str = ""):
        self.path = path
        self.problems = problems
        super().__init__(f"checkpoint {path} is damaged: " + "; ".join(problems) + hint)


def _owner(name: str, world_size: int) -> int:
    """Which rank hashes a file: the rank number in its name (DeepSpeed's ``zero_pp_rank_3_...``,
    our ``rng_rank3.safetensors``) modulo the world size, else rank 0."""
    m = _RANK_IN_NAME.search(name)
    return int(m.group(1)) % world_size if m else 0


def _file_entry(path: Path, *, fsync: bool = False) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative paths of the regular files in a checkpoint dir except the meta file (no symlinks)."""
    out = []
    for dirpath, dirnames, files in os.walk(ckpt_dir):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        for fname in files:
            p = Path(dirpath) / fname
            rel = p.relative_to(ckpt_dir).as_posix()
            if rel != META_FILE and not p.is_symlink() and p.is_file():
                out.append(rel)
    return sorted(out)


def hash_share(
    ckpt_dir: Path, rank: int, world_size: int, *, fsync: bool = False
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of this rank's share of the files; ``fsync``: also flush each to disk, so
    that making a checkpoint durable is split over the ranks like the hashing (no rank-0 walk)."""
    return {
        rel: _file_entry(ckpt_dir / rel, fsync=fsync)
        for rel in _checkpoint_files(ckpt_dir)
        if _owner(Path(rel).name, world_size) == rank
    }


def verify_checkpoint(path: str | Path, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """Check ``path`` against the sizes and sha256 sums in its meta file; return the problems.

    Not collective: ``rank``/``world_size`` select the share of files this caller checks (the
    defaults check all of them). An empty list means intact. A checkpoint written before
    checksums existed (no ``files`` in its meta) is reported as unverifiable only in the log.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return [f"{path / META_FILE}: missing or unreadable (the completion marker)"] if rank == 0 else []
    files = meta.get("files")
    if not isinstance(files, dict):
        if rank == 0:
            log.warning("%s has no checksums (written by an older ltscale); not verified", path)
        return []
    problems = []
    for rel, want in sorted(files.items()):
        if _owner(Path(rel).name, world_size) != rank:
            continue
        p = path / rel
        if p.is_symlink() or not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != want.get("size"):
            how = "truncated" if size < int(want.get("size", 0)) else "grown"
            problems.append(f"{p}: {how}, {size} bytes instead of {want.get('size')}")
            continue
        if _file_entry(p)["sha256"] != want.get("sha256"):
            problems.append(f"{p}: contents changed (sha256 mismatch)")
    return problems
