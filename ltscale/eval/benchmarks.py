"""The evaluation benchmarks by name: GSM8K test, SVAMP, ASDiv (local data pack) and MultiArith (hub).

Why a registry: ``ltscale eval --data gsm8k svamp asdiv`` should mean the same files on every
machine, and a report should name benchmarks, not paths. Local benchmarks are read from
``$LTSCALE_DATA_DIR`` (default ``<repo>/../shared/data``: the normalized data pack, one JSONL of
question / steps / answer records per split, README "Training data"); nothing is downloaded for them. MultiArith is not in the data pack (its authors state
no license), so ``multiarith`` loads the hub copy ``ChilleD/MultiArith`` and therefore needs
network access (never used by tests). Any other ``--data`` value is passed to
:func:`ltscale.data.records.load_records` unchanged (a local file/dir or a hub dataset name).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltscale.data.sources import data_dir
from ltscale.fsutil import atomic_write_text

__all__ = [
    "BENCHMARKS",
    "DEFAULT_SUITE",
    "Benchmark",
    "benchmark_name",
    "data_dir",
    "expand_sources",
    "load_benchmark",
    "suite_average",
    "suite_examples_path",
    "write_suite_results",
]


@dataclass(frozen=True)
class Benchmark:
    """One named benchmark: a path under the data dir, or a hub dataset with its field names."""

    name: str
    path: str | None = None  # relative to data_dir()
    hub: str | None = None  # "owner/name" (split below)
    split: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", path="gsm8k/test.jsonl"),
    "svamp": Benchmark("svamp", path="svamp/all.jsonl"),
    "asdiv": Benchmark("asdiv", path="asdiv/all.jsonl"),
    # The paper's fourth benchmark; hub only (see module docstring).
    "multiarith": Benchmark("multiarith", hub="ChilleD/MultiArith", split="test", answer_field="final_ans"),
}

#: What ``--data all`` evaluates: the benchmarks that work offline.
DEFAULT_SUITE: tuple[str, ...] = ("gsm8k", "svamp", "asdiv")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """``all`` -> :data:`DEFAULT_SUITE`; duplicates dropped, order kept."""
    out: list[str] = []
    for s in sources:
        for item in DEFAULT_SUITE if s == "all" else (s,):
            if item not in out:
                out.append(item)
    return out


def benchmark_name(source: str) -> str:
    """Display name of a ``--data`` value: the registry name, else the file stem / hub name."""
    if source.lower() in BENCHMARKS:
        return source.lower()
    p = Path(source)
    if p.suffix in (".jsonl", ".json"):
        # ``svamp/all.jsonl`` -> ``svamp``; ``gsm8k/test.jsonl`` -> ``gsm8k-test``
        return p.parent.name if p.stem == "all" and p.parent.name else p.stem
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _hub_records(bench: Benchmark, limit: int | None) -> list[Any]:
    import datasets  # lazily: only MultiArith needs it, and only online

    from ltscale.data.records import DataError, record_from_dict

    try:
        ds = datasets.load_dataset(bench.hub, split=bench.split)
    except Exception as e:  # re-raised naming the benchmark and what to do
        raise DataError(
            f"{bench.name}: cannot load hub dataset {bench.hub}[{bench.split}] ({e}); "
            "this benchmark needs network access (or a local JSONL via --data FILE)"
        ) from e
    out = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        obj = {
            "id": f"{bench.name}-{i:05d}",
            "question": row[bench.question_field],
            "steps": [],  # MultiArith ships no gold steps: difficulty 0 for every problem
            "answer": str(row[bench.answer_field]),
        }
        try:
            out.append(record_from_dict(obj, default_id=obj["id"]))
        except DataError as e:
            raise DataError(f"{bench.hub}[{bench.split}] row {i}: {e}") from None
    return out


def load_benchmark(source: str, *, split: str | None = None, limit: int | None = None) -> list[Any]:
    """Records of a named benchmark, or of any source :func:`load_records` understands."""
    from ltscale.data.records import DataError, load_records

    bench = BENCHMARKS.get(source.lower())
    if bench is None:
        return load_records(source, split=split, strict=True, limit=limit)
    if bench.hub is not None:
        return _hub_records(bench, limit)
    path = data_dir() / str(bench.path)
    if not path.is_file():
        raise DataError(
            f"benchmark {bench.name!r}: {path} not found; set LTSCALE_DATA_DIR to the data pack "
            "(the directory holding gsm8k/, svamp/, asdiv/)"
        )
    return load_records(path, strict=True, limit=limit)


# ------------------------------------------------------------------------------- several benchmarks


def suite_average(summaries: dict[str, Any]) -> dict[str, float]:
    """Unweighted mean over benchmarks (the paper's "Avg." column), not over pooled examples.

    ``summaries`` maps benchmark name -> :class:`~ltscale.eval.evaluate.EvalSummary` or its dict.
    """
    rows = [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in summaries.values()]
    if not rows:
        return {"n_benchmarks": 0}
    keys = ("accuracy_official", "accuracy_numeric", "mean_latent_tokens", "mean_generated_tokens")
    out: dict[str, float] = {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}
    out["n_benchmarks"] = len(rows)
    out["n"] = sum(int(r["n"]) for r in rows)
    return out


def suite_examples_path(output: Path, name: str) -> Path:
    """Per-benchmark example file of a suite summary: ``<stem>.<benchmark>.examples.jsonl``."""
    output = Path(output)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return output.with_name(f"{output.stem}.{safe}.examples.jsonl")


def write_suite_results(
    results: dict[str, tuple[Any, Sequence[dict[str, Any]]]],
    output: Path,
    *,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a several-benchmark summary: ``{"benchmarks": {name: summary}, "average": {...}}``.

    ``results`` maps benchmark name -> (EvalSummary, per-example dicts). Each benchmark's examples
    go to :func:`suite_examples_path`; its summary records that file under ``"examples"``.
    """
    output = Path(output)
    benches: dict[str, Any] = {}
    for name, (summary, examples) in results.items():
        ex_path = suite_examples_path(output, name)
        atomic_write_text(ex_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        benches[name] = {**summary.to_dict(), "examples": ex_path.name}
    payload: dict[str, Any] = {"benchmarks": benches, "average": suite_average(benches)}
    if meta:
        payload["meta"] = meta
    atomic_write_text(output, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return output
