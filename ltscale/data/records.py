"""Validating math word-problem records.

Everything downstream (formatting, confidence scoring, evaluation) works on :class:`Record`,
one normalized problem ``{id, question, steps, answer}``. :mod:`ltscale.data.sources` reads rows
from files, directories and the hub; this module is the single place that turns a row into a
record, so it is also the single place that validates them: a bad row fails here with the file
and line that caused it, instead of surfacing as a shape error deep inside a training step.

Accepted row forms (the first that applies):

* ``{"question", "steps": [str], "answer"}`` (+ optional ``id``; other fields are kept in
  :attr:`Record.extra`): the normalized files in ``$LTSCALE_DATA_DIR``, Coconut's JSON, the hub's
  ``whynlp/gsm8k-aug``, ICoT text lines after parsing;
* ``{"question", "cot": str, "answer"}``: the hub's ``zen-E/GSM8k-Aug``; a ``cot`` made of
  ``<<...>>`` groups gives one step per group, any other ``cot`` one step per non-empty line;
* ``{"question", "answer": "... #### N"}`` (GSM8K): steps are the non-empty solution lines before
  ``####`` with ``<<...>>`` calculator annotations removed (the annotations themselves go to
  ``extra["steps_calc"]``, as in the normalized gsm8k files), the answer is the text after ``####``.

A step written as one calculator annotation, ``"<<48/2=24>>"`` (GSM8K-Aug as Coconut and the hub
store it), is stored without the brackets, ``"48/2=24"``: the data pack's GSM8K-Aug files and
``steps_calc`` spell equations that way, so every copy of GSM8K-Aug yields the same records.

``id`` is optional: a missing id is generated as ``<prefix>-<row index, 5 digits>`` where the prefix
is the file stem (``raw_test-00007``) or ``<dataset>-<split>`` for hub data (``gsm8k-test-00007``,
the same scheme as the normalized gsm8k files).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sources import DataError, RowError, Source, open_source

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "LoadReport",
    "Record",
    "iter_records",
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
_CALC_STEP_RE = re.compile(r"<<([^<>]*)>>")
_CALC_ONLY_RE = re.compile(r"\s*(?:<<[^<>]*>>\s*)+")


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
        """Number of gold reasoning steps: the paper's difficulty axis (docs/method.md §10.2)."""
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


def normalize_answer(s: str) -> str:
    """Canonical answer text: strip, drop thousands commas and ``$``, drop trailing ``.``.

    Deliberately string-level only ("18.0" stays "18.0"): numeric equivalence is a metric choice
    that lives in eval, while the paper's own scorer compares strings (docs/method.md §11.20).
    """
    s = str(s).strip().replace(",", "").replace("$", "").strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _is_number(s: str) -> bool:
    return _NUMBER_RE.fullmatch(s) is not None


def _check_str(obj: Mapping[str, Any], key: str) -> str:
    if key not in obj:
        raise RowError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(
            f"wrong type for '{key}'", f"field '{key}' must be a string, got {type(value).__name__}"
        )
    return _check_unicode(value, key)


def _check_unicode(value: str, key: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``); tokenizers then fail deep inside encoding."""
    if value.isascii():  # the common case, checked without encoding
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(
            "invalid unicode", f"field '{key}' is not valid Unicode (lone surrogate at position {e.start})"
        ) from None
    return value


def _parse_answer(raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise RowError(
            "wrong type for 'answer'", f"field 'answer' must be a string, got {type(raw).__name__}"
        )
    answer = normalize_answer(str(raw))
    if not answer:
        raise RowError("empty answer")
    if not _is_number(answer):
        raise RowError("non-numeric answer", f"answer {str(raw)!r} is not a number")
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
    except RowError as e:
        raise DataError(e.detail) from None


def _unwrap_step(step: str) -> str:
    """``"<<48/2=24>>"`` -> ``"48/2=24"`` (module docstring); any other step is only stripped."""
    step = step.strip()
    m = _CALC_STEP_RE.fullmatch(step) if step.startswith("<<") else None
    return m.group(1).strip() if m else step


def _steps_field(obj: Mapping[str, Any]) -> list[str]:
    steps_raw = obj["steps"]
    if not isinstance(steps_raw, list | tuple):
        raise RowError("wrong type for 'steps'", "field 'steps' must be a list of strings")
    steps = []
    for i, s in enumerate(steps_raw):
        if not isinstance(s, str):
            raise RowError("wrong type for 'steps'", "field 'steps' must be a list of strings")
        step = _unwrap_step(_check_unicode(s, f"steps[{i}]"))
        if step:  # an empty step carries no reasoning and would render as an empty "## Step i:" line
            steps.append(step)
    return steps


def _cot_field(obj: Mapping[str, Any]) -> list[str]:
    cot = obj["cot"]
    if not isinstance(cot, str):
        raise RowError("wrong type for 'cot'", f"field 'cot' must be a string, got {type(cot).__name__}")
    _check_unicode(cot, "cot")
    if _CALC_ONLY_RE.fullmatch(cot):
        return [t for t in (m.strip() for m in _CALC_STEP_RE.findall(cot)) if t]
    return [line.strip() for line in cot.splitlines() if line.strip()]


def _record_from_obj(obj: Any, default_id: str) -> Record:
    if not isinstance(obj, Mapping):
        raise RowError("not a JSON object", f"expected a JSON object, got {type(obj).__name__}")
    question = _check_str(obj, "question").strip()
    if not question:
        raise RowError("empty question")
    if "answer" not in obj:
        raise RowError("missing field 'answer'")
    extra = {k: v for k, v in obj.items() if k not in _CORE_FIELDS}
    if "steps" in obj:
        steps = _steps_field(obj)
        answer = _parse_answer(obj["answer"])
    elif "cot" in obj:
        steps = _cot_field(obj)
        del extra["cot"]
        answer = _parse_answer(obj["answer"])
    else:
        solution = obj["answer"]
        if not isinstance(solution, str) or "####" not in solution:
            raise RowError(
                "missing field 'steps'",
                "missing field 'steps' (and 'answer' is not a GSM8K solution with '#### N')",
            )
        steps, calc, raw_answer = _split_gsm8k_solution(_check_unicode(solution, "answer"))
        answer = _parse_answer(raw_answer)
        extra.setdefault("steps_calc", calc)
    rid = obj.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise RowError("wrong type for 'id'", f"field 'id' must be a string, got {type(rid).__name__}")
    rid = _check_unicode(str(rid), "id")
    if not rid:
        raise RowError("empty id")
    return Record(id=rid, question=question, steps=tuple(steps), answer=answer, extra=extra)


def iter_records(
    source: str | Path | Source,
    *,
    split: str | None = None,
    strict: bool = True,
    limit: int | None = None,
    report: LoadReport | None = None,
) -> Iterator[Record]:
    """:func:`load_records` as a stream: one record at a time, ``report`` filled as rows pass
    (its warning summary is logged when the stream is exhausted)."""
    src = source if isinstance(source, Source) else open_source(source, split)
    report = report if report is not None else LoadReport(source=src.name)
    report.source = src.name
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(src.rows()):
        if limit is not None and report.n_ok >= limit:
            break
        try:
            if isinstance(row, RowError):
                raise row
            record = _record_from_obj(row, f"{src.prefix}-{index:05d}")
            if record.id in first_seen:
                raise RowError(
                    "duplicate id", f"duplicate id {record.id!r} (first at {first_seen[record.id]})"
                )
        except RowError as e:
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
        report.n_ok += 1
        yield record
    if report.n_skipped:
        logger.warning(
            "%s: skipped %d of %d rows: %s (first: %s)",
            src.name,
            report.n_skipped,
            report.n_ok + report.n_skipped,
            dict(report.reasons),
            report.first_errors[0],
        )


def load_records_with_report(
    source: str | Path,
    *,
    split: str | None = None,
    strict: bool = True,
    limit: int | None = None,
) -> tuple[list[Record], LoadReport]:
    """Like :func:`load_records`, also returning what was kept and skipped."""
    report = LoadReport(source=str(source))
    records = list(iter_records(source, split=split, strict=strict, limit=limit, report=report))
    return records, report


def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    strict: bool = True,
    limit: int | None = None,
) -> list[Record]:
    """Load and validate records from a file, a directory or a hub dataset.

    ``source`` is tried, in order, as: a named source (``gsm8k-calc``); an existing local
    ``.jsonl``/``.json``/``.txt``/``.parquet`` file; an existing directory (``{split}.*``, the hub
    layout ``data/{split}-*.parquet``, else ``all.*`` inside, so ``svamp/`` serves any split); a
    Hugging Face hub dataset name, optionally ``name:config`` (``openai/gsm8k:main``; split
    defaults to ``train``). Anything that looks like a path but does not exist is an error, never
    a hub lookup, so local loading never touches the network. :mod:`ltscale.data.sources`
    describes each layout.

    ``strict=True`` raises :class:`DataError` (``file:line: reason``) at the first bad row:
    malformed JSON, missing or mistyped field, empty question, non-numeric answer, duplicate id.
    ``strict=False`` skips such rows and logs one warning summary
    (:func:`load_records_with_report` returns the counts). ``limit`` stops after that many good
    records.
    """
    records, _ = load_records_with_report(source, split=split, strict=strict, limit=limit)
    return records
