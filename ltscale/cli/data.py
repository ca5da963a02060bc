"""``ltscale data``: ``synth`` (seeded synthetic problems as JSONL) and ``check`` (strict validation
of a record file; exit 1 on invalid records, like a linter)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ltscale.cli import common
from ltscale.fsutil import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthetic data and record validation")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{synth,check}")
    q = dsub.add_parser("synth", help="write seeded synthetic arithmetic problems as JSONL")
    q.add_argument("--n", type=common.positive_int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.set_defaults(func=run_synth)
    q = dsub.add_parser("check", help="validate a record file (strict); print the count or the error")
    q.add_argument("file")
    q.add_argument("--split", default=None)
    q.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    from ltscale.data.synthetic import generate_problems  # noqa: PLC0415 - ltscale.data imports torch

    records = generate_problems(args.n, seed=args.seed)
    out = Path(args.out)
    atomic_write_text(out, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} records to {out}")
    return common.EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.exists():
        raise common.UserError(f"data file not found: {args.file}")
    from ltscale.data.records import DataError, load_records  # noqa: PLC0415 - ltscale.data imports torch

    try:
        records = load_records(str(path), split=args.split, strict=True)
    except DataError as e:
        print(f"ltscale: invalid data: {e}", file=sys.stderr)
        return common.EXIT_INVALID
    counts: dict[int, int] = {}
    for r in records:
        d = int(r.difficulty)
        counts[d] = counts.get(d, 0) + 1
    hist = ", ".join(f"{d}: {c}" for d, c in sorted(counts.items()))
    print(f"{path}: {len(records)} records OK (steps -> count: {hist or 'none'})")
    return common.EXIT_OK
