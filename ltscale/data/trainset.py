"""The run's tokenized training set: built once per run, memory-mapped on every rank.

Why: at GSM8K-Aug scale (385k problems) tokenizing on every rank at every launch cost minutes
before the first step, and keeping each example as Python objects cost gigabytes per rank. So the
training data is tokenized once per run into ``<run dir>/data/train`` (the path is
``ltscale.rundir``'s; an Arrow table, :mod:`ltscale.data.arrow_store`; rank 0 reads the data, every
rank tokenizes a share, :mod:`ltscale.data.build`); every rank memory-maps it; a resume or a
requeue finds it and only checks its fingerprint. Nothing here holds one Python object per example: an example is
built when a batch asks for it.

Layout: ``records`` (every record read: ``id``, ``question``, ``steps``, ``answer``; what
Coconut's stage sequences are rebuilt from), ``part-<r>`` (the examples rank ``r`` tokenized:
the record ``row``, ``input_ids`` = prompt + response + eos as
:func:`~ltscale.data.formatting.encode_example` builds them, uint16 when the vocabulary allows,
and ``prompt_len``; labels are the ids with the prompt masked, so they are not stored), and
``meta.json`` (format, fingerprint, number of parts and examples), written last. Example ``i`` is
the ``i``-th kept record in record order, whatever the number of parts.

The fingerprint covers what decides those rows: the training data's bytes (every file read, or the
hub dataset's cache files; the synthetic generator's settings and source), the tokenizer (its full
serialized state, added tokens included), the formatting settings (chat template on/off,
``max_length``, strict) and the source of the modules that parse and format (records, sources,
formatting), plus the tokenizer library versions. A different fingerprint rebuilds the table; an
unreadable or truncated table is rebuilt too (rank 0), and a rank that finds a table other than
the one rank 0 announced stops with an error naming the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import build, formatting, records, sources
from .arrow_store import StoreError, read_meta, read_table
from .build import ONE_PROCESS, Ranks
from .formatting import IGNORE_INDEX, Encoded
from .records import Record

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "Examples",
    "TrainSet",
    "build_trainset",
    "code_fingerprint",
    "tokenizer_fingerprint",
]

FORMAT = "ltscale-trainset-v1"


def code_fingerprint(modules: Iterable[Any] = (records, sources, formatting)) -> str:
    """sha256 of the source files of ``modules``: a change in parsing or formatting code must
    not reuse sequences the old code produced."""
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything of ``tokenizer`` that decides ids: its serialized state (vocabulary,
    merges, normalizer, added tokens), chat template, special tokens and library versions."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    added = sorted(
        (i, t.content, bool(t.special)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    info = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": added,
        "len": len(tokenizer),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    return h.hexdigest()


def build_trainset(
    path: Path,
    records_: Iterable[Record] | None,
    tokenizer,
    *,
    fingerprint: str,
    use_chat_template: bool | None,
    max_length: int | None,
    strict: bool,
    ranks: Ranks = ONE_PROCESS,
) -> int:
    """Tokenize ``records_`` (a stream, read on rank 0 only) into the table dir ``path``, the
    tokenizing shared by ``ranks`` (:mod:`ltscale.data.build`); returns the number of rows.

    The rows are :func:`~ltscale.data.formatting.encode_example`'s sequences (over-long ones raise
    when ``strict``, else are dropped and counted, as :func:`~ltscale.data.formatting.encode_records`
    does). The table appears atomically when complete.
    """
    return build.build_trainset(
        Path(path),
        records_,
        tokenizer,
        meta={"format": FORMAT, "fingerprint": fingerprint},
        use_chat_template=use_chat_template,
        max_length=max_length,
        strict=strict,
        ranks=ranks,
    )


class _Table:
    """A mapped table's record batches, and which batch holds a given row."""

    def __init__(self, table) -> None:
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])

    def locate(self, row: int):
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.batches[k], row - int(self.starts[k])

    def column(self, name: str, fn: Callable[[Any], np.ndarray]) -> np.ndarray:
        """``fn(batch column)`` of every batch, concatenated (one small array per example)."""
        parts = [fn(b.column(name)) for b in self.batches]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _offsets(column) -> np.ndarray:
    return column.offsets.to_numpy(zero_copy_only=True)


class TrainSet(Sequence[Encoded]):
    """The tokenized training set of a run (module docstring), a lazy ``Sequence[Encoded]``.

    ``train[i]`` builds example ``i``'s :class:`Encoded` on demand; the per-example arrays
    (``lengths``, ``prompt_lens``, ``n_steps``) are what stage-level decisions read instead of
    scanning examples.
    """

    def __init__(self, path: Path, *, fingerprint: str | None = None) -> None:
        self.path = Path(path)
        meta = read_meta(self.path)
        if meta is None:
            raise StoreError(f"{self.path}: no tokenized training set here")
        if meta.get("format") != FORMAT:
            raise StoreError(f"{self.path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise StoreError(
                f"{self.path}: built from other data, tokenizer or formatting (fingerprint "
                f"{str(meta.get('fingerprint'))[:12]}, this run's is {fingerprint[:12]})"
            )
        self.fingerprint: str = meta["fingerprint"]
        self._records = _Table(read_table(self.path / "records"))
        self._parts = [_Table(read_table(self.path / f"part-{r}")) for r in range(int(meta["parts"]))]
        rows = np.concatenate([t.column("row", lambda c: c.to_numpy()) for t in self._parts])
        if len(rows) != meta["rows"]:
            raise StoreError(
                f"{self.path}: {len(rows)} examples in the parts, meta.json records {meta['rows']}"
            )
        # example i = the i-th kept record in record order: its part and its position there
        order = np.argsort(rows, kind="stable")
        sizes = [int(t.starts[-1]) for t in self._parts]
        self._row = rows[order]
        self._part = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[order]
        self._pos = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])[order]
        lengths = [t.column("input_ids", lambda c: np.diff(_offsets(c))) for t in self._parts]
        self.lengths = np.concatenate(lengths)[order]
        self.prompt_lens = np.concatenate(
            [t.column("prompt_len", lambda c: c.to_numpy()) for t in self._parts]
        )[order]
        self.n_steps = self._records.column("steps", lambda c: np.diff(_offsets(c)))[self._row]

    def __len__(self) -> int:
        return len(self._row)

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"training example {i} out of range ({n} examples)")
        return i % n

    def input_ids(self, i: int) -> np.ndarray:
        """Example ``i``'s token ids as a read-only view of the mapped table."""
        i = self._index(int(i))
        batch, j = self._parts[self._part[i]].locate(int(self._pos[i]))
        column = batch.column("input_ids")
        offsets = _offsets(column)
        return column.values.to_numpy(zero_copy_only=True)[offsets[j] : offsets[j + 1]]

    def __getitem__(self, i: int) -> Encoded:  # type: ignore[override]
        i = self._index(int(i))
        ids = self.input_ids(i).tolist()
        p = int(self.prompt_lens[i])
        batch, j = self._records.locate(int(self._row[i]))
        return Encoded(
            input_ids=ids, labels=[IGNORE_INDEX] * p + ids[p:], prompt_len=p, id=batch.column("id")[j].as_py()
        )

    def record(self, i: int) -> Record:
        """The record example ``i`` was built from (its ``extra`` fields are not kept)."""
        batch, j = self._records.locate(int(self._row[self._index(int(i))]))
        col = batch.column
        return Record(
            id=col("id")[j].as_py(),
            question=col("question")[j].as_py(),
            steps=tuple(col("steps")[j].as_py()),
            answer=col("answer")[j].as_py(),
        )

    def select(self, indices: Sequence[int] | np.ndarray) -> Examples:
        return Examples(self, indices)


class Examples(Sequence[Encoded]):
    """``base[indices[j]]`` for ``j < len(indices)``, rewritten by ``fn(j, example)`` if given.

    What a curriculum stage trains on: the examples its sampler draws (``indices``, sorted), as
    a method rewrites them (``map``). Lazy: nothing is built until a batch asks for it.
    ``latent_counts[j]`` is how many latent slots example ``j`` holds after the rewrites (the
    stage's pass count is its maximum); base examples hold none, since formatting encodes
    special-token text in data as plain text.
    """

    def __init__(
        self,
        base: Sequence[Encoded],
        indices: Sequence[int] | np.ndarray | None = None,
        fn: Callable[[int, Encoded], Encoded] | None = None,
        latent_counts: np.ndarray | None = None,
    ) -> None:
        self.base = base
        self.indices = (
            np.arange(len(base), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        )
        self._fn = fn
        self._latents = latent_counts

    @classmethod
    def of(cls, examples: Sequence[Encoded]) -> Examples:
        """``examples`` itself when it is an :class:`Examples`, else all of it, unchanged."""
        if isinstance(examples, Examples):
            return examples
        if isinstance(examples, TrainSet):
            return examples.select(np.arange(len(examples)))
        return cls(list(examples))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Encoded:  # type: ignore[override]
        e = self.base[int(self.indices[j])]
        return self._fn(int(j) % len(self), e) if self._fn is not None else e

    def map(self, fn: Callable[[int, Encoded], Encoded], latent_counts: np.ndarray) -> Examples:
        """These examples rewritten by ``fn(j, example)``, which adds ``latent_counts[j]`` slots."""
        if len(latent_counts) != len(self):
            raise ValueError(f"{len(latent_counts)} latent counts for {len(self)} examples")
        inner = self._fn
        composed = fn if inner is None else (lambda j, e: fn(j, inner(j, e)))
        return Examples(self.base, self.indices, composed, self.latent_counts() + np.asarray(latent_counts))

    def latent_counts(self) -> np.ndarray:
        return self._latents if self._latents is not None else np.zeros(len(self), dtype=np.int64)

    def max_latents(self) -> int:
        return int(self.latent_counts().max()) if len(self) else 0

    # Per-example facts of the base examples (before any rewrite), read from the table when the base
    # is a TrainSet (or an Examples over one) instead of building every example.

    def lengths(self) -> np.ndarray:
        """Token counts (what scoring batches by)."""
        if isinstance(self.base, TrainSet):
            return self.base.lengths[self.indices]
        if isinstance(self.base, Examples):
            return self.base.lengths()[self.indices]
        return np.array([len(self.base[int(i)].input_ids) for i in self.indices], dtype=np.int64)

    def prompt_len(self, j: int) -> int:
        i = int(self.indices[j])
        if isinstance(self.base, TrainSet):
            return int(self.base.prompt_lens[i])
        return self.base.prompt_len(i) if isinstance(self.base, Examples) else self.base[i].prompt_len

    def prompt_ids(self, j: int) -> list[int]:
        """Example ``j``'s prompt (methods' rewrites keep the prompt first)."""
        i = int(self.indices[j])
        if isinstance(self.base, TrainSet):
            return self.base.input_ids(i)[: int(self.base.prompt_lens[i])].tolist()
        if isinstance(self.base, Examples):
            return self.base.prompt_ids(i)
        e = self.base[i]
        return list(e.input_ids[: e.prompt_len])

    def steps_counts(self) -> np.ndarray:
        """Reasoning steps of each example's record."""
        if isinstance(self.base, TrainSet):
            return self.base.n_steps[self.indices]
        if isinstance(self.base, Examples):
            return self.base.steps_counts()[self.indices]
        raise TypeError("records are only kept with a run's tokenized training set")

    def record(self, j: int) -> Record:
        i = int(self.indices[j])
        if isinstance(self.base, (TrainSet, Examples)):
            return self.base.record(i)
        raise TypeError("records are only kept with a run's tokenized training set")

    def fingerprint(self) -> str:
        """Identity of the base examples (ids and tokens): what cached per-example results key on."""
        h = hashlib.sha256()
        if isinstance(self.base, (TrainSet, Examples)):
            h.update(
                self.base.fingerprint().encode()
                if isinstance(self.base, Examples)
                else self.base.fingerprint.encode()
            )
            h.update(self.indices.tobytes())
            return h.hexdigest()
        for i in self.indices:
            e = self.base[int(i)]
            h.update(str(e.id).encode() + b"\0")
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()

    def at_train_index(self, i: int) -> Encoded:
        """The example of base index ``i`` (``indices`` sorted: what the sampler draws from)."""
        j = int(np.searchsorted(self.indices, i))
        if j >= len(self.indices) or self.indices[j] != i:
            raise KeyError(f"training example {i} is not among this stage's examples")
        return self[j]
