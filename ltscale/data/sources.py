"""Where records come from: local files and directories, the Hugging Face hub, named sources.

This module reads rows; :mod:`ltscale.data.records` validates them. A row is a dict (or a
:class:`RowError` for a row that could not even be parsed) together with where it came from, so
every later error can name ``file:line``. Readers stream: a 385k-row file is never held as a list
of Python objects (the tokenized copy a run trains on is built from this stream, see
:mod:`ltscale.data.trainset`).

File layouts (``data.train`` / ``data.eval`` and ``load_records``):

* ``.jsonl``: one JSON object per line (the normalized files of the data pack; ``ltscale data synth``);
* ``.json``: a JSON array of objects (Coconut's ``gsm_train.json``: ``question``, ``steps``,
  ``answer``), read one object at a time; JSONL under a ``.json`` name also works;
* ``.txt``: the ICoT text layout of GSM8K-Aug, one problem per line,
  ``question||<<a*b=c>> <<c+d=e>> #### answer`` (da03/Internalize_CoT_Step_by_Step's
  ``data/gsm8k/{train,valid,test}.txt``);
* ``.parquet``: the hub's storage (``whynlp/gsm8k-aug``: ``data/{split}-NNNNN-of-NNNNN.parquet``,
  columns ``question``, ``steps``, ``answer``), read one row group at a time.

A directory resolves a split to ``{split}.jsonl|.json|.txt|.parquet``, then to the hub layout
``[data/]{split}-*.parquet`` (a ``snapshot_download`` of a hub dataset), then to ``all.*``.

Named sources: ``gsm8k-calc`` is GSM8K from the data pack (``$LTSCALE_DATA_DIR/gsm8k``) with the
solutions' own calculator annotations as steps (``"48/2=24"``, field ``steps_calc``): the same
equation-only format as GSM8K-Aug, available offline. Its natural-language steps stay in
``extra["steps_nl"]``. Anything else that is not a local path is a hub dataset name,
``name[:config]`` (``whynlp/gsm8k-aug``, ``openai/gsm8k:main``), loaded through ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NAMED_SOURCES", "DataError", "RowError", "Source", "data_dir", "open_source"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
_ICOT_SEP = "||"
_ICOT_STEP = re.compile(r"<<[^<>]*>>")
_ICOT_STEPS = re.compile(r"\s*(?:<<[^<>]*>>\s*)*")
_HASH_CHUNK = 1 << 20


class DataError(ValueError):
    """A data problem, always naming where it happened (``file:line`` or ``hub[split] row i``)."""


class RowError(Exception):
    """A row-level problem; ``category`` is the short key a lenient load counts it under."""

    def __init__(self, category: str, detail: str | None = None) -> None:
        super().__init__(detail or category)
        self.category = category
        self.detail = detail or category


Rows = Iterator[tuple[str, Any]]


@dataclass
class Source:
    """One resolved ``data.*`` value: what to show, the id prefix of rows without an id, the rows.

    ``files`` are the local files read (their bytes are the content identity); a hub source
    names its ``hub`` identity instead. :meth:`content_hash` covers both.
    """

    name: str
    prefix: str
    rows: Callable[[], Rows]
    files: list[Path] = field(default_factory=list)
    hub: dict[str, Any] | None = None

    def content_hash(self) -> str:
        """sha256 over the bytes of every file this source reads (hub: the dataset's cache files)."""
        h = hashlib.sha256(
            json.dumps({"name": self.name, "hub": self.hub}, sort_keys=True, default=str).encode()
        )
        for path in self.files:
            h.update(b"\0" + str(path.name).encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        return h.hexdigest()


def data_dir() -> Path:
    """``$LTSCALE_DATA_DIR``, else ``<repo>/../shared/data`` (the data pack next to a checkout)."""
    env = os.environ.get("LTSCALE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


# ------------------------------------------------------------------------------------- file readers


def _iter_jsonl(path: Path) -> Rows:
    with path.open("rb") as f:  # decoded per line: one bad byte names its line, not the whole file
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RowError("invalid UTF-8", f"invalid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError("malformed JSON", f"malformed JSON: {e.msg} (column {e.colno})")


_WS = re.compile(r"[ \t\n\r]*")


def _iter_json(path: Path) -> Rows:
    """A JSON array of rows, decoded one element at a time (a 385k-row Coconut file would
    otherwise become one list of Python dicts); JSONL under a ``.json`` name also works."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(path)
            return
        if not isinstance(data, dict):  # one object per file is a valid one-row dataset
            raise DataError(f"{path}:1: expected a JSON array of objects, got {type(data).__name__}")
        yield f"{path}[0]", data
        return
    decoder = json.JSONDecoder()
    pos = _WS.match(text, pos + 1).end()
    index = 0
    while not text.startswith("]", pos):
        if index:
            if not text.startswith(",", pos):
                raise _json_error(path, text, pos, "expected ',' or ']' between array elements")
            pos = _WS.match(text, pos + 1).end()
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, text, e.pos, f"malformed JSON: {e.msg}") from None
        yield f"{path}[{index}]", row  # arrays carry no useful line numbers: name the element
        index += 1
        pos = _WS.match(text, pos).end()
        if pos >= len(text):
            raise _json_error(path, text, pos, "unterminated array")
    if text[pos + 1 :].strip():
        raise _json_error(path, text, pos + 1, "extra data after the array")


def _json_error(path: Path, text: str, pos: int, msg: str) -> DataError:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return DataError(f"{path}:{line}: {msg} (column {column})")


def parse_icot_line(line: str) -> dict[str, Any]:
    """``question||<<e1>> <<e2>> #### answer`` -> ``{"question", "steps": ["<<e1>>", ...], "answer"}``.

    Steps keep their brackets here; :func:`ltscale.data.records.record_from_dict` removes them
    the same way for every source.
    """
    if line.count(_ICOT_SEP) != 1 or "####" not in line.split(_ICOT_SEP, 1)[1]:
        raise RowError("not ICoT text", "expected 'question||<<steps>> #### answer'")
    question, rest = line.split(_ICOT_SEP)
    body, _, answer = rest.rpartition("####")
    if not _ICOT_STEPS.fullmatch(body):
        raise RowError(
            "not ICoT text", f"steps {body.strip()!r} are not '<<...>>' equations separated by spaces"
        )
    return {"question": question, "steps": _ICOT_STEP.findall(body), "answer": answer.strip()}


def _iter_icot(path: Path) -> Rows:
    for where, raw in _iter_lines(path):
        if isinstance(raw, RowError):
            yield where, raw
            continue
        try:
            yield where, parse_icot_line(raw)
        except RowError as e:
            yield where, e


def _iter_lines(path: Path) -> Iterator[tuple[str, str | RowError]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield where, RowError("invalid UTF-8", f"invalid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if line.strip():
                yield where, line


def _iter_parquet(paths: list[Path]) -> Rows:
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                yield f"{path} row {row}", obj
                row += 1


_READERS: dict[str, Callable[[Path], Rows]] = {".jsonl": _iter_jsonl, ".json": _iter_json, ".txt": _iter_icot}


def _file_source(path: Path, prefix: str | None = None) -> Source:
    if path.suffix == ".parquet":
        return Source(str(path), prefix or path.stem, lambda: _iter_parquet([path]), files=[path])
    reader = _READERS.get(path.suffix, _iter_jsonl)
    return Source(str(path), prefix or path.stem, lambda: reader(path), files=[path])


def _parquet_shards(directory: Path, split: str) -> list[Path]:
    """The hub's storage of one split: ``[data/]{split}-00000-of-00003.parquet`` ..."""
    for sub in (directory / "data", directory):
        shards = sorted(sub.glob(f"{split}-*.parquet"))
        if shards:
            return shards
    return []


def _dir_source(directory: Path, split: str | None) -> Source:
    names = [f"{split}{suffix}" for suffix in LOCAL_SUFFIXES] if split else []
    for name in names:
        if (directory / name).is_file():
            return _file_source(directory / name)
    shards = _parquet_shards(directory, split) if split else []
    if shards:
        prefix = f"{directory.resolve().name}-{split}"  # the hub's id scheme for the same data
        return Source(str(directory), prefix, lambda: _iter_parquet(shards), files=shards)
    fallback = [f"all{suffix}" for suffix in LOCAL_SUFFIXES]
    for name in fallback:
        if (directory / name).is_file():
            return _file_source(directory / name)
    present = sorted(p.name for p in directory.iterdir() if p.suffix in LOCAL_SUFFIXES)
    wanted = names[:2] + (["data/" + f"{split}-*.parquet"] if split else []) + fallback[:2]
    raise DataError(
        f"{directory}: no {' or '.join(wanted)} in this directory (split={split!r}); "
        f"present: {', '.join(present) or 'none'}"
    )


def _hub_source(source: str, split: str | None) -> Source:
    import datasets  # imported lazily: local loading must not pay for (or depend on) it

    name, _, config = source.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # re-raised with the source named
        raise DataError(f"{source}[{split}]: cannot load hub dataset: {e}") from e

    def rows() -> Rows:
        for i, row in enumerate(ds):
            yield f"{source}[{split}] row {i}", row

    files = [
        Path(f["filename"]) for f in getattr(ds, "cache_files", None) or [] if Path(f["filename"]).is_file()
    ]
    identity = {"dataset": name, "config": config or None, "split": split}
    if not files:  # an in-memory dataset (no cache files): datasets' own content fingerprint
        identity["fingerprint"] = getattr(ds, "_fingerprint", None)
    return Source(f"{source}[{split}]", f"{name.rsplit('/', 1)[-1]}-{split}", rows, files=files, hub=identity)


# ----------------------------------------------------------------------------------- named sources


def _gsm8k_calc(split: str | None) -> Source:
    """GSM8K with equation-only steps from its calculator annotations (module docstring)."""
    directory = data_dir() / "gsm8k"
    if not directory.is_dir():
        raise DataError(
            f"gsm8k-calc: {directory} not found; set LTSCALE_DATA_DIR to the data pack (the directory "
            "holding gsm8k/)"
        )
    base = _dir_source(directory, split or "train")

    def rows() -> Rows:
        for where, obj in base.rows():
            if isinstance(obj, dict) and "steps_calc" in obj:
                obj = {**obj, "steps": obj["steps_calc"], "steps_nl": obj.get("steps")}
                del obj["steps_calc"]
            elif isinstance(obj, dict) and "steps" in obj:
                obj = RowError(
                    "missing field 'steps_calc'", "missing field 'steps_calc' (gsm8k-calc needs it)"
                )
            yield where, obj

    return Source(f"gsm8k-calc:{base.name}", base.prefix, rows, files=base.files, hub={"named": "gsm8k-calc"})


NAMED_SOURCES: dict[str, Callable[[str | None], Source]] = {"gsm8k-calc": _gsm8k_calc}


def _looks_local(source: str) -> bool:
    return (
        source.endswith(LOCAL_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
        or source in (".", "..")
        or "\\" in source
    )


def open_source(source: str | Path, split: str | None) -> Source:
    """Resolve ``source`` (see the module docstring for the order) without reading any row."""
    text = str(source)
    if not isinstance(source, Path) and text in NAMED_SOURCES:
        return NAMED_SOURCES[text](split)
    path = Path(text).expanduser()
    if path.exists():
        return _dir_source(path, split) if path.is_dir() else _file_source(path)
    if isinstance(source, Path) or _looks_local(text):
        # Never fall through to the hub for something that is clearly a path: a typo must not
        # turn into a network request (or a confusing "dataset not found on the hub").
        raise DataError(f"{text}: no such file or directory")
    return _hub_source(text, split)
