"""Building a run's tokenized training set (:mod:`ltscale.data.trainset`), with every rank's CPU.

Tokenizing is the expensive part of preparing 385k problems (a single core needs about half a
minute with the tiny default's tokenizer), and at that point every rank is idle. So:

1. rank 0 alone reads the training data (the one rank that touches the files or the hub) and
   writes its records (id, question, steps, answer) as the table ``records`` of a staging
   directory next to the final one;
2. every rank tokenizes its share of the records, the ``r``-th of ``W`` contiguous slices (so it
   maps only that slice's pages), memory-mapped from that table, into a table ``part-<r>`` of its
   own (each row keeps its record's row number);
3. rank 0 writes the directory's ``meta.json`` and renames it into place.

Nothing is copied a second time: the reader (:class:`~ltscale.data.trainset.TrainSet`) orders
the parts' rows by record row, so the examples are the single-process build's, in the same order,
whatever the number of ranks.
Every rank learns of every failure (a bad record in step 1, an over-long sequence under ``strict``
in step 2) and raises the same error, the first in record order; none waits for a table that will
not come. With one process (the default :class:`Ranks`) the three steps simply run in turn.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrow_store import publish_dir, read_table, write_meta, write_table
from .formatting import encode_id_batches, length_error
from .records import Record
from .sources import DataError

logger = logging.getLogger(__name__)

__all__ = ["ONE_PROCESS", "Ranks", "build_trainset", "id_type", "on_rank0"]

_ROWS = 4096  # rows per written batch, and per batch read back


def _identity(x: Any) -> Any:
    return x


def _alone(x: Any) -> list:
    return [x]


@dataclass(frozen=True)
class Ranks:
    """The processes that prepare a run's data together. ``broadcast(x)`` returns rank 0's ``x``
    on every rank, ``all_gather(x)`` every rank's ``x`` in rank order; the defaults are one process."""

    rank: int = 0
    world: int = 1
    broadcast: Callable[[Any], Any] = _identity
    all_gather: Callable[[Any], list] = _alone


ONE_PROCESS = Ranks()


def on_rank0(work: Callable[[], Any], ranks: Ranks) -> Any:
    """``work()`` on rank 0 only; every rank returns its result, or raises its error: a rank must
    not wait for (or go on without) a file that rank 0 failed to write."""
    result = message = None
    error: BaseException | None = None
    if ranks.rank == 0:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error, message = e, f"{type(e).__name__}: {e}"
    result, message = ranks.broadcast((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise DataError(f"rank 0 could not prepare the training data: {message}")
    return result


def _schemas(id_type=None):
    """The staged records' schema, and a part's for token ids of ``id_type``."""
    import pyarrow as pa

    records = pa.schema([("id", pa.large_string()), ("question", pa.large_string()),
                         ("steps", pa.large_list(pa.large_string())), ("answer", pa.large_string())])  # fmt: skip
    part = pa.schema([("row", pa.int64()), ("input_ids", pa.large_list(id_type or pa.int32())),
                      ("prompt_len", pa.int32())])  # fmt: skip
    return records, part


def id_type(vocab_size: int):
    """Token ids are stored as uint16 when the vocabulary allows (half the bytes every rank maps)."""
    import pyarrow as pa

    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def _stage_records(staging: Path, records_: Iterable[Record]) -> int:
    """Step 1 (rank 0): the records, in order, as the staging table ``records``."""
    import pyarrow as pa

    schema = _schemas()[0]

    def batches() -> Iterator:
        it = iter(records_)
        while chunk := [r for _, r in zip(range(_ROWS), it)]:
            yield pa.record_batch([
                pa.array([r.id for r in chunk], pa.large_string()),
                pa.array([r.question for r in chunk], pa.large_string()),
                pa.array([list(r.steps) for r in chunk], pa.large_list(pa.large_string())),
                pa.array([r.answer for r in chunk], pa.large_string()),
            ], schema=schema)  # fmt: skip

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return write_table(staging / "records", schema, batches(), {})


def _my_records(staging: Path, ranks: Ranks) -> Iterator[tuple[int, Record]]:
    table = read_table(staging / "records")
    n = table.num_rows
    mine = np.arange(ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world)
    for a in range(0, len(mine), _ROWS):
        rows = mine[a : a + _ROWS]
        cols = table.take(rows).to_pydict()
        for row, rid, q, steps, ans in zip(rows, cols["id"], cols["question"], cols["steps"], cols["answer"]):
            yield int(row), Record(id=rid, question=q, steps=tuple(steps), answer=ans)


def _tokenize_part(
    staging: Path,
    tokenizer,
    ranks: Ranks,
    *,
    use_chat_template: bool | None,
    max_length: int | None,
    strict: bool,
) -> dict:
    """Step 2 (every rank): this rank's rows tokenized into the staging table ``part-<rank>``.
    Returns what happened, never raises: every rank must reach the exchange that follows."""
    schema = _schemas(id_type(len(tokenizer)))[1]
    eos = tokenizer.eos_token_id
    done = {"dropped": 0, "seen": 0, "error": None}
    rows_of: dict[str, int] = {}

    def records_() -> Iterator[Record]:
        for row, r in _my_records(staging, ranks):
            rows_of[r.id] = row
            yield r

    def batches() -> Iterator:
        pending: tuple[list, list, list] = ([], [], [])
        for chunk, prompts, responses in encode_id_batches(
            tokenizer, records_(), use_chat_template=use_chat_template
        ):
            done["seen"] += len(chunk)
            for r, p, a in zip(chunk, prompts, responses):
                row = rows_of.pop(r.id)
                error = length_error(r.id, len(p), len(a), max_length)
                if error is not None:
                    if strict:
                        done["error"] = (row, str(error))
                        raise error
                    done["dropped"] += 1
                    continue
                pending[0].append(row)
                pending[1].append(p + a + [eos])
                pending[2].append(len(p))
            if len(pending[0]) >= _ROWS:
                yield _part_batch(pending, schema)
                pending = ([], [], [])
        if pending[0]:
            yield _part_batch(pending, schema)

    try:
        write_table(staging / f"part-{ranks.rank}", schema, batches(), {"rank": ranks.rank})
    except Exception as e:  # noqa: BLE001 - reported through the exchange (docstring)
        done["error"] = done["error"] or (-1, f"rank {ranks.rank}: {type(e).__name__}: {e}")
    return done


def _part_batch(pending: tuple[list, list, list], schema):
    import itertools

    import pyarrow as pa

    rows, ids, prompt_lens = pending
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    value_type = schema.field("input_ids").type.value_type
    return pa.record_batch([
        pa.array(np.asarray(rows, dtype=np.int64)),
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values).cast(value_type)),
        pa.array(np.asarray(prompt_lens, dtype=np.int32)),
    ], schema=schema)  # fmt: skip


def build_trainset(path: Path, records_: Iterable[Record] | None, tokenizer, *, meta: dict,
                   use_chat_template: bool | None, max_length: int | None, strict: bool,
                   ranks: Ranks = ONE_PROCESS) -> int:  # fmt: skip
    """Tokenize ``records_`` (read on rank 0 only; other ranks pass None) into the directory
    ``path`` (``records``, ``part-<r>`` tables and ``meta``), the work split over ``ranks`` (module
    docstring). Over-long sequences raise under ``strict``, else are dropped and counted. Returns
    the number of examples."""
    staging = path.parent / f".{path.name}.staging"
    published = False
    try:
        n = on_rank0(lambda: _stage_records(staging, records_ or ()), ranks)
        done = _tokenize_part(staging, tokenizer, ranks, use_chat_template=use_chat_template,
                              max_length=max_length, strict=strict)  # fmt: skip
        reports = ranks.all_gather(done)
        errors = sorted(r["error"] for r in reports if r["error"] is not None)
        if errors:
            raise DataError(errors[0][1])
        kept = n - sum(r["dropped"] for r in reports)
        if not kept:
            raise DataError(
                "data.train: no usable training examples (every record was dropped or the source is empty)"
            )

        def publish() -> None:
            write_meta(staging, {**meta, "parts": ranks.world, "rows": kept})
            publish_dir(staging, path)

        on_rank0(publish, ranks)
        published = True
    finally:
        if ranks.rank == 0 and not published:
            shutil.rmtree(staging, ignore_errors=True)
    if kept < n and ranks.rank == 0:
        logger.warning("dropped %d of %d records longer than max_length=%s", n - kept, n, max_length)
    return kept
