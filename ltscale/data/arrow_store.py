"""Arrow tables a run keeps in its run dir: written once as a directory, read memory-mapped.

The one on-disk format of the data layer, used by the tokenized training set
(:mod:`ltscale.data.trainset`) and the insertion sites of the latent stages
(:mod:`ltscale.data.insertion`)::

    <dir>/table.arrow   Arrow IPC file (record batches)
    <dir>/meta.json     what the table was built from (a fingerprint), its row count and byte size

Why IPC files opened with ``pyarrow.memory_map``: every rank of a node maps the same pages, so a
385k-problem training set costs its page cache once per node, not a copy of Python objects per
rank, and opening it is instant on a restart. Why a directory renamed into place: a job killed
mid-write (Slurm preemption) leaves the previous table or none, never a half-written one that a
resume would trust; ``meta.json`` is written last inside the temporary directory, and a reader
checks the row count and size it records, so a table truncated later is an error, not data.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ltscale.fsutil import fsync_dir

from .sources import DataError

__all__ = [
    "META_FILE",
    "TABLE_FILE",
    "StoreError",
    "publish_dir",
    "read_meta",
    "read_table",
    "write_meta",
    "write_table",
]

TABLE_FILE = "table.arrow"
META_FILE = "meta.json"


class StoreError(DataError):
    """A stored table is missing, incomplete or unreadable (the message names the directory)."""


def publish_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path`` (same parent), replacing what is there so
    that a reader finds the old directory or the new one, never a mixture or nothing but a stub."""
    old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fsync_dir(tmp)
    if path.exists():
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)  # put the previous result back rather than lose it
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_table(path: Path, schema, batches: Iterable, meta: dict[str, Any]) -> int:
    """Write ``batches`` (``pyarrow.RecordBatch``es of ``schema``) and ``meta`` as the table dir
    ``path``, replacing an existing one atomically. Returns the number of rows written."""
    import pyarrow as pa

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        rows = 0
        with pa.OSFile(str(tmp / TABLE_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        size = (tmp / TABLE_FILE).stat().st_size
        with open(tmp / TABLE_FILE, "rb") as f:
            os.fsync(f.fileno())
        write_meta(tmp, {**meta, "rows": rows, "table_bytes": size})
        publish_dir(tmp, path)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any] | None:
    """The table dir's ``meta.json``, or None when there is none (never written, or not finished)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path / META_FILE}: unreadable ({e})") from None


def read_table(path: Path, meta: dict[str, Any] | None = None):
    """The table of dir ``path``, memory-mapped (no copy), checked against its ``meta.json``."""
    import pyarrow as pa

    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    if meta is None:
        raise StoreError(f"{path}: no {META_FILE} (never written, or the write did not finish)")
    file = path / TABLE_FILE
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise StoreError(f"{file}: missing") from None
    if size != meta.get("table_bytes"):
        raise StoreError(
            f"{file}: {size} bytes, but {META_FILE} records {meta.get('table_bytes')} (truncated?)"
        )
    try:
        table = pa.ipc.open_file(pa.memory_map(str(file), "r")).read_all()
        table.validate()
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{file}: not a readable Arrow file ({e})") from None
    if table.num_rows != meta.get("rows"):
        raise StoreError(f"{file}: {table.num_rows} rows, but {META_FILE} records {meta.get('rows')}")
    return table
