"""The directory of checkpoints: tag names, discovery, the ``latest`` pointer and rotation.

Layout under ``root``::

    root/
      latest                 text: the newest complete tag (written last, atomically)
      zero_to_fp32.py        DeepSpeed's offline consolidation script (copied by DeepSpeed)
      <tag>/                 one complete checkpoint (``checkpoint.py`` owns what is inside)
      .tmp-<tag>/            a save in progress (or a crashed one; removed by the next save)
      .trash-<tag>/          an older ``<tag>`` being replaced by a re-save of the same tag

A directory without the ``.tmp-`` prefix is complete by construction (``checkpoint.py`` renames
it into place only after every file and the meta file are on disk). Everything here only ever
deletes what it recognises as ours: real directories whose name matches :data:`TAG_PATTERN` and
that hold our meta file, and the ``.tmp-``/``.trash-`` leftovers; symlinks are only unlinked.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ltscale.rundir import CKPT_LATEST

from .integrity import read_meta

log = logging.getLogger(__name__)

__all__ = [
    "LATEST",
    "TAG_PATTERN",
    "TMP_PREFIX",
    "TRASH_PREFIX",
    "clean_stale",
    "latest_tag",
    "list_checkpoints",
    "read_latest",
    "remove_tree",
    "rotate",
    "validate_tag",
]

LATEST = CKPT_LATEST
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# Tags we create and are allowed to delete: no leading dot (tmp/trash dirs), no path separators.
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def validate_tag(tag: str) -> None:
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag) or tag == LATEST:
        raise ValueError(
            f"checkpoint tag {tag!r} must match {TAG_PATTERN.pattern} and not be {LATEST!r} "
            "(no leading dot, no path separators)"
        )


def remove_tree(path: Path) -> None:
    """Delete a directory we own. A symlink is only unlinked - its target is never touched."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # rmtree unlinks symlinks inside the tree instead of following them
    elif path.exists():
        path.unlink()


def list_checkpoints(root: str | Path) -> list[str]:
    """Complete ltscale checkpoints in ``root``, oldest first.

    Only real directories (not symlinks) whose name matches :data:`TAG_PATTERN` and that contain
    our ``ltscale_meta.json`` count - anything else in ``root`` is not ours and is never touched.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[tuple[int, str]] = []
    for child in root.iterdir():
        name = child.name
        if name == LATEST or not TAG_PATTERN.match(name) or child.is_symlink() or not child.is_dir():
            continue
        meta = read_meta(child)
        if meta is None:
            continue
        found.append((int(meta.get("saved_at_ns", 0)), name))
    return [name for _, name in sorted(found)]


def latest_tag(root: str | Path) -> str | None:
    """The tag to resume from: ``latest`` if it names an existing directory, else the newest
    complete checkpoint (a crash between the rename and the ``latest`` update), else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text(encoding="utf-8").strip()
        if tag and (root / tag).is_dir():
            return tag
        log.warning(
            "%s names %r, which is not a directory; falling back to the newest complete checkpoint",
            pointer,
            tag,
        )
    done = list_checkpoints(root)
    return done[-1] if done else None


def _protected_by_symlinks(root: Path) -> set[str]:
    """Names of checkpoint dirs in ``root`` that a symlink in ``root`` points to (e.g. ``best``)."""
    names: set[str] = set()
    real_root = root.resolve()
    for child in root.iterdir():
        if child.is_symlink():
            try:
                target = child.resolve(strict=False)
            except (OSError, RuntimeError):
                continue
            if target.parent == real_root:
                names.add(target.name)
    return names


def rotate(root: Path, keep_last_n: int, protect: set[str]) -> list[str]:
    """Delete all but the newest ``keep_last_n`` complete checkpoints; return the deleted tags.

    Never deletes ``protect`` (the one just written, the one ``latest`` names), any directory a
    symlink in ``root`` points to, symlinks themselves, or anything that is not ours.
    """
    if keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
    done = list_checkpoints(root)
    keep = set(done[-keep_last_n:]) | protect | _protected_by_symlinks(root)
    deleted = []
    for name in done:
        if name in keep:
            continue
        path = root / name
        if path.is_symlink():  # re-check right before deleting
            continue
        log.info("rotating out checkpoint %s", path)
        shutil.rmtree(path)
        deleted.append(name)
    return deleted


def clean_stale(root: Path) -> None:
    """Remove leftovers of crashed saves (``.tmp-*``, ``.trash-*``); only unlink symlinks."""
    for child in root.iterdir():
        if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            log.warning("removing leftover of an interrupted save: %s", child)
            remove_tree(child)


def read_latest(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
