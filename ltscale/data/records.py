"""Loading and validating math word-problem records.

Everything downstream (formatting, confidence scoring, evaluation) works on :class:`Record`,
one normalized problem ``{id, question, steps, answer}``. This module is the single place that
turns files and hub datasets into records, so it is also the single place that validates them:
a bad row fails here with the file and line that caused it, instead of surfacing as a shape
error deep inside a training step.

Accepted inputs (see :func:`load_records`):

* the record format ``{"id", "question", "steps": [str], "answer"}`` (the normalized files in
  ``$LTSCALE_DATA_DIR``, GSM8K-Aug/Coconut style); fields other than those four are kept in
  :attr:`Record.extra`;
* the GSM8K form ``{"question", "answer": "... #### N"}``: steps are the non-empty solution lines
  before ``####`` with ``<<...>>`` calculator annotations removed (the annotations themselves go
  to ``extra["steps_calc"]``, as in the normalized gsm8k files), the answer is the text after
  ``####``.

``id`` is optional: a missing id is generated as ``<prefix>-<row index, 5 digits>`` where the prefix
is the file stem (``raw_test-00007``) or ``<dataset>-<split>`` for hub data (``gsm8k-test-00007``,
the same scheme as the normalized gsm8k files).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "LoadReport",
    "Record",
    "load_records",
    "load_records_with_report",
    "normalize_answer",
    "record_from_dict",
]

_CORE_FIELDS = ("id", "question", "steps", "answer")
_CALC_RE = re.compile(r"<<([^<>]*)>>")
# ASCII digits only: "３" (full-width) or "٣" (Arabic-Indic) would pass \d but never equal a
# model's "3", silently scoring every prediction wrong.
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_LOCAL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A data problem, always naming where it happened (``file:line`` or ``hub[split] row i``)."""


@dataclass(frozen=True)
class Record:
    """One math word problem.

    ``steps`` is a tuple so records are hashable and cannot be mutated behind a cache's back;
    lists are converted on construction. ``extra`` holds dataset-specific fields (grade, type,
    steps_calc, ...) and is excluded from the hash (dicts are unhashable) but not from equality.
    """

    id: str
    question: str
    steps: tuple[str, ...]
    answer: str
    extra: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def difficulty(self) -> int:
        """Number of gold reasoning steps: the paper's difficulty axis (spec §8.3)."""
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL form (record format, extra fields inlined), readable by :func:`load_records`."""
        return {
            "id": self.id,
            "question": self.question,
            "steps": list(self.steps),
            "answer": self.answer,
            **self.extra,
        }


@dataclass
class LoadReport:
    """What a lenient load kept and dropped; ``reasons`` counts skipped rows by reason category."""

    source: str
    n_ok: int = 0
    n_skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)


class _RowError(Exception):
    """Internal: a row-level problem; ``category`` is the short key counted in LoadReport.reasons."""

    def __init__(self, category: str, detail: str | None = None) -> None:
        super().__init__(detail or category)
        self.category = category
        self.detail = detail or category


def normalize_answer(s: str) -> str:
    """Canonical answer text: strip, drop thousands commas and ``$``, drop trailing ``.``.

    Deliberately string-level only ("18.0" stays "18.0"): numeric equivalence is a metric choice
    that lives in eval, while the paper's own scorer compares strings (spec §10.20).
    """
    s = str(s).strip().replace(",", "").replace("$", "").strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _is_number(s: str) -> bool:
    return _NUMBER_RE.fullmatch(s) is not None


def _check_str(obj: Mapping[str, Any], key: str) -> str:
    if key not in obj:
        raise _RowError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _RowError(
            f"wrong type for '{key}'", f"field '{key}' must be a string, got {type(value).__name__}"
        )
    return _check_unicode(value, key)


def _check_unicode(value: str, key: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``); tokenizers then fail deep inside encoding."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _RowError(
            "invalid unicode", f"field '{key}' is not valid Unicode (lone surrogate at position {e.start})"
        ) from None
    return value


def _parse_answer(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise _RowError(
            "wrong type for 'answer'", f"field 'answer' must be a string, got {type(raw).__name__}"
        )
    answer = normalize_answer(str(raw))
    if not answer:
        raise _RowError("empty answer")
    if not _is_number(answer):
        raise _RowError("non-numeric answer", f"answer {str(raw)!r} is not a number")
    return answer


def _split_gsm8k_solution(solution: str) -> tuple[list[str], list[str], str]:
    """GSM8K ``"line\\nline\\n#### N"`` -> (steps, calculator annotations, raw answer)."""
    body, _, raw_answer = solution.rpartition("####")
    steps = []
    for line in body.splitlines():
        text = _CALC_RE.sub("", line).strip()
        if text:
            steps.append(text)
    calc = [m.strip() for m in _CALC_RE.findall(body)]
    return steps, calc, raw_answer


def record_from_dict(obj: Any, *, default_id: str) -> Record:
    """Validate one raw row (record format or GSM8K form) and build a :class:`Record`.

    Raises :class:`DataError` with the reason only; callers prefix the location.
    """
    try:
        return _record_from_obj(obj, default_id)
    except _RowError as e:
        raise DataError(e.detail) from None


def _record_from_obj(obj: Any, default_id: str) -> Record:
    if not isinstance(obj, Mapping):
        raise _RowError("not a JSON object", f"expected a JSON object, got {type(obj).__name__}")
    question = _check_str(obj, "question").strip()
    if not question:
        raise _RowError("empty question")
    if "answer" not in obj:
        raise _RowError("missing field 'answer'")
    extra = {k: v for k, v in obj.items() if k not in _CORE_FIELDS}
    if "steps" in obj:
        steps_raw = obj["steps"]
        if not isinstance(steps_raw, list | tuple) or not all(isinstance(s, str) for s in steps_raw):
            raise _RowError("wrong type for 'steps'", "field 'steps' must be a list of strings")
        for i, s in enumerate(steps_raw):
            _check_unicode(s, f"steps[{i}]")
        # Empty step strings carry no reasoning and would render as an empty "## Step i:" line.
        steps = [s.strip() for s in steps_raw if s.strip()]
        answer = _parse_answer(obj["answer"])
    else:
        solution = obj["answer"]
        if not isinstance(solution, str) or "####" not in solution:
            raise _RowError(
                "missing field 'steps'",
                "missing field 'steps' (and 'answer' is not a GSM8K solution with '#### N')",
            )
        steps, calc, raw_answer = _split_gsm8k_solution(_check_unicode(solution, "answer"))
        answer = _parse_answer(raw_answer)
        extra.setdefault("steps_calc", calc)
    rid = obj.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise _RowError("wrong type for 'id'", f"field 'id' must be a string, got {type(rid).__name__}")
    rid = _check_unicode(str(rid), "id")
    if not rid:
        raise _RowError("empty id")
    return Record(id=rid, question=question, steps=tuple(steps), answer=answer, extra=extra)


# ---------------------------------------------------------------------------------------------
# sources: each yields (location, row object or a _RowError for an unparseable row)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # decoded per line: one bad byte names its line, not the whole file
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _RowError("invalid UTF-8", f"invalid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _RowError("malformed JSON", f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file: a JSON array of rows (Coconut style), or JSONL under a .json name."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        yield from _iter_jsonl(path)
        return
    if isinstance(data, dict):
        # one object per file is a valid one-row dataset; anything else is ambiguous
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON array of objects, got {type(data).__name__}")
    # JSON arrays carry no useful line numbers; name the array index instead.
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _looks_local(source: str) -> bool:
    return (
        source.endswith(_LOCAL_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
        or source in (".", "..")
        or "\\" in source
    )


def _resolve_dir(directory: Path, split: str | None) -> Path:
    candidates = ([f"{split}.jsonl", f"{split}.json"] if split else []) + ["all.jsonl", "all.json"]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir() if p.suffix in _LOCAL_SUFFIXES)
    raise DataError(
        f"{directory}: no {' or '.join(candidates)} in this directory (split={split!r}); "
        f"present: {', '.join(present) or 'none'}"
    )


def _iter_hub(source: str, split: str | None) -> tuple[str, Iterator[tuple[str, Any]]]:
    import datasets  # imported lazily: local loading must not pay for (or depend on) it

    name, _, config = source.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # re-raised with the source named
        raise DataError(f"{source}[{split}]: cannot load hub dataset: {e}") from e
    prefix = f"{name.rsplit('/', 1)[-1]}-{split}"

    def rows() -> Iterator[tuple[str, Any]]:
        for i, row in enumerate(ds):
            yield f"{source}[{split}] row {i}", row

    return prefix, rows()


def _open_source(source: str | Path, split: str | None) -> tuple[str, str, Iterable[tuple[str, Any]]]:
    """-> (display name, id prefix, rows)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            path = _resolve_dir(path, split)
        if path.suffix == ".json":
            return str(path), path.stem, _iter_json(path)
        return str(path), path.stem, _iter_jsonl(path)
    if isinstance(source, Path) or _looks_local(text):
        # Never fall through to the hub for something that is clearly a path: a typo must not
        # turn into a network request (or a confusing "dataset not found on the hub").
        raise DataError(f"{text}: no such file or directory")
    prefix, rows = _iter_hub(text, split)
    return text, prefix, rows


def load_records_with_report(
    source: str | Path,
    *,
    split: str | None = None,
    strict: bool = True,
    limit: int | None = None,
) -> tuple[list[Record], LoadReport]:
    """Like :func:`load_records`, also returning what was kept and skipped."""
    name, prefix, rows = _open_source(source, split)
    report = LoadReport(source=name)
    records: list[Record] = []
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(row, _RowError):
                raise row
            record = _record_from_obj(row, f"{prefix}-{index:05d}")
            if record.id in first_seen:
                raise _RowError(
                    "duplicate id", f"duplicate id {record.id!r} (first at {first_seen[record.id]})"
                )
        except _RowError as e:
            message = f"{where}: {e.detail}"
            if strict:
                raise DataError(message) from None
            report.n_skipped += 1
            report.reasons[e.category] += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(message)
            logger.debug("skipping %s", message)
            continue
        first_seen[record.id] = where
        records.append(record)
    report.n_ok = len(records)
    if report.n_skipped:
        logger.warning(
            "%s: skipped %d of %d rows: %s (first: %s)",
            name,
            report.n_skipped,
            report.n_ok + report.n_skipped,
            dict(report.reasons),
            report.first_errors[0],
        )
    return records, report


def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    strict: bool = True,
    limit: int | None = None,
) -> list[Record]:
    """Load and validate records from a file, a directory or a hub dataset.

    ``source`` is tried, in order, as: an existing local ``.jsonl``/``.json`` file; an existing
    directory (``{split}.jsonl``, else ``all.jsonl`` inside, so ``svamp/`` serves any split); a
    Hugging Face hub dataset name, optionally ``name:config`` (``openai/gsm8k:main``; split
    defaults to ``train``). Anything that looks like a path but does not exist is an error, never
    a hub lookup, so local loading never touches the network.

    ``strict=True`` raises :class:`DataError` (``file:line: reason``) at the first bad row:
    malformed JSON, missing or mistyped field, empty question, non-numeric answer, duplicate id.
    ``strict=False`` skips such rows and logs one warning summary
    (:func:`load_records_with_report` returns the counts). ``limit`` stops after that many good
    records.
    """
    records, _ = load_records_with_report(source, split=split, strict=strict, limit=limit)
    return records
