"""``ltscale report RUN_DIR...``: one Markdown table of method x benchmark from eval JSON files
(``ltscale compare`` results have their own report: ``ltscale.eval.compare_results``).

What a run dir contributes (all optional, found by content, not by name):

* ``stage<N>/eval.json`` (the trainer's eval after each stage): the **highest** stage counts, as
  the benchmark named by the run's ``data.eval`` (``config.resolved.yaml``);
* any other ``*.json`` up to two levels down that is an ``ltscale eval`` output, single
  (``accuracy_official`` + ``meta.benchmark``) or several (``benchmarks``): these override the
  stage eval for the same benchmark (e.g. the full GSM8K test after a subset eval in training);
* ``analysis.json`` (the highest stage's, or one from ``ltscale analyze``): collapse numbers and
  the difficulty correlation.

Runs are grouped by method label: the run config's ``method`` (a run without a config uses its
directory name minus a trailing ``-seedN``/``_sN``), so several seeds of one method become one row
with mean ± sample standard deviation. Accuracies are percentages; "avg" is the unweighted mean
over the benchmarks of that run (the paper's "Avg."), averaged over seeds like the others.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ltscale import rundir
from ltscale.eval.benchmarks import benchmark_name

__all__ = ["RunResult", "collect_run", "render_report"]

_SEED_SUFFIX = re.compile(r"[-_](seed|s)\d+$")


@dataclass
class RunResult:
    """What one run dir holds: accuracies per benchmark and latent/collapse numbers."""

    path: Path
    label: str
    seed: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # benchmark -> fraction (metric chosen)
    latent: dict[str, float] = field(default_factory=dict)  # benchmark -> mean latent tokens
    analysis: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None


def _config(run: Path) -> dict[str, Any]:
    path = run / rundir.CONFIG_FILE
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _summary_bench(d: dict[str, Any], default: str) -> str:
    meta = d.get("meta") or {}
    if meta.get("benchmark"):
        return str(meta["benchmark"])
    data = meta.get("data")
    if isinstance(data, str) and data:
        return benchmark_name(data)
    return default


def _add(result: RunResult, bench: str, summary: dict[str, Any], metric: str, source: Path) -> None:
    key = "accuracy_numeric" if metric == "numeric" else "accuracy_official"
    result.accuracy[bench] = float(summary[key])
    result.latent[bench] = float(summary.get("mean_latent_tokens", float("nan")))
    result.sources.append(str(source))


def collect_run(run: Path | str, *, metric: str = "official") -> RunResult:
    """Gather one run dir's eval and analysis JSONs (see the module docstring)."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run directory")
    cfg = _config(run)
    label = cfg.get("method") or _SEED_SUFFIX.sub("", run.resolve().name)
    seed = (cfg.get("train") or {}).get("seed")
    result = RunResult(path=run, label=str(label), seed=seed)
    data_eval = str((cfg.get("data") or {}).get("eval") or "eval")
    stage_bench = benchmark_name(data_eval) if data_eval != "synthetic" else "synthetic"
    # An in-training eval on the first N problems only (eval.subset, data.eval_limit) says so.
    partial = (cfg.get("eval") or {}).get("subset") or (cfg.get("data") or {}).get("eval_limit")
    stages = [rundir.stage_dir(run, n) for n in rundir.stages(run)]
    top_eval = next(
        (p / rundir.EVAL_FILE for p in reversed(stages) if (p / rundir.EVAL_FILE).is_file()), None
    )
    if top_eval is not None:
        summary = read_json(top_eval)
        name = f"{stage_bench}[:{int(summary['n'])}]" if partial else stage_bench
        _add(result, name, summary, metric, top_eval)
    top_analysis = next(
        (p / rundir.ANALYSIS_FILE for p in reversed(stages) if (p / rundir.ANALYSIS_FILE).is_file()), None
    )
    for path in sorted(run.glob("*.json")) + sorted(run.glob("*/*.json")):
        if path.parent.name.startswith("stage") or path.name.endswith(".examples.json"):
            continue
        d = read_json(path)
        if not isinstance(d, dict):
            continue
        if "benchmarks" in d and isinstance(d["benchmarks"], dict):
            for bench, summary in d["benchmarks"].items():
                _add(result, bench, summary, metric, path)
        elif "accuracy_official" in d:
            _add(result, _summary_bench(d, path.stem), d, metric, path)
        elif "probe_collapse" in d or "collapse" in d:
            top_analysis = path  # an explicit `ltscale analyze` output wins over the stage's
    if top_analysis is not None:
        result.analysis = read_json(top_analysis)
        result.sources.append(str(top_analysis))
    if not result.accuracy:
        raise ValueError(f"{run}: no eval results (stage*/eval.json or ltscale eval JSON files)")
    return result


def _mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_mean_std(xs: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = _mean_std([x * scale for x in xs if x is not None])
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _collapse(r: RunResult, which: str) -> float | None:
    """Probe collapse numbers (they exist for every hidden/fusion run), else generated ones."""
    return collapse_value(r.analysis, which, ("probe_collapse", "collapse"))


def collapse_value(analysis: dict[str, Any], which: str, sources: Sequence[str]) -> float | None:
    for source in sources:
        steps = analysis.get(source) or {}
        if steps:
            ks = sorted(steps, key=int)
            k = ks[0] if which == "cos_first" else ks[-1]
            key = "effective_rank" if which == "rank_last" else "mean_cos"
            v = steps[k].get(key)
            return float(v) if v is not None else None
    return None


def render_report(runs: Sequence[RunResult], *, metric: str = "official") -> str:
    """Markdown: one row per method label (mean ± std over its runs), then the sources."""
    benches: list[str] = []
    for r in runs:
        for b in r.accuracy:
            if b not in benches:
                benches.append(b)
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    head = ["method", "runs", *benches]
    if len(benches) > 1:
        head.append("avg")
    head += [
        "mean latent tokens",
        "collapse cos (first / last step)",
        "eff. rank (last step)",
        "difficulty ρ",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, rs in groups.items():
        seeds = [r.seed for r in rs if r.seed is not None]
        runs_cell = str(len(rs)) + (f" (seeds {', '.join(map(str, seeds))})" if len(rs) > 1 and seeds else "")
        row = [label, runs_cell]
        row += [fmt_mean_std([r.accuracy.get(b) for r in rs if b in r.accuracy], 100.0) for b in benches]
        if len(benches) > 1:
            row.append(fmt_mean_std([sum(r.accuracy.values()) / len(r.accuracy) for r in rs], 100.0))
        row.append(fmt_mean_std([sum(r.latent.values()) / len(r.latent) for r in rs if r.latent]))
        first = fmt_mean_std([v for r in rs if (v := _collapse(r, "cos_first")) is not None], digits=3)
        last = fmt_mean_std([v for r in rs if (v := _collapse(r, "cos_last")) is not None], digits=3)
        row.append("-" if first == "-" else f"{first} / {last}")
        row.append(fmt_mean_std([v for r in rs if (v := _collapse(r, "rank_last")) is not None]))
        rho = [(r.analysis.get("difficulty") or {}).get("spearman") for r in rs]
        row.append(fmt_mean_std([v for v in rho if v is not None], digits=3))
        lines.append("| " + " | ".join(row) + " |")
    metric_text = (
        "numeric-tolerant accuracy (first number of the answer compared as a value)"
        if metric == "numeric"
        else "official accuracy (text after the last '#', exact string match, as the paper's evaluator)"
    )
    lines += [
        "",
        f"Accuracy: {metric_text}, in %; mean ± sample std over runs when a method has several. "
        "Collapse: mean pairwise cosine of the latent embeddings fed at a latent step (probe = forced "
        "latent steps after the prompt) and their effective rank; ρ: Spearman correlation of latent "
        "tokens with the number of gold steps.",
        "",
        "Sources:",
        *[f"- {r.label}: {', '.join(r.sources)}" for r in runs],
    ]
    return "\n".join(lines) + "\n"
