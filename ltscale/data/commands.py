"""The ``ltscale data`` subcommands: ``synth`` (seeded synthetic problems as JSONL) and ``check``
(strict validation of a record file; exit 1 on invalid records, like a linter)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ltscale.cli_common import EXIT_INVALID, EXIT_OK, UserError


def _record_to_json(record: Any) -> dict[str, Any]:
    """The on-disk record form ``{id, question, steps, answer, ...}`` that load_records reads."""
    if isinstance(record, dict):
        return dict(record)
    if hasattr(record, "to_dict"):  # ltscale.data.records.Record: also inlines extra fields
        return record.to_dict()
    return {
        "id": record.id,
        "question": record.question,
        "steps": list(record.steps),
        "answer": record.answer,
    }


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ltscale.data.synthetic import generate_problems
    from ltscale.eval.evaluate import atomic_write_text

    records = generate_problems(args.n, seed=args.seed)
    out = Path(args.out)
    text = "".join(json.dumps(_record_to_json(r), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out, text)
    print(f"wrote {len(records)} records to {out}")
    return EXIT_OK


def cmd_data_check(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {args.file}")
    from ltscale.data.records import DataError, load_records

    try:
        records = load_records(str(path), split=args.split, strict=True)
    except DataError as e:
        print(f"ltscale: invalid data: {e}", file=sys.stderr)
        return EXIT_INVALID
    counts: dict[int, int] = {}
    for r in records:
        d = int(r.difficulty)
        counts[d] = counts.get(d, 0) + 1
    hist = ", ".join(f"{d}: {c}" for d, c in sorted(counts.items()))
    print(f"{path}: {len(records)} records OK (steps -> count: {hist or 'none'})")
    return EXIT_OK
